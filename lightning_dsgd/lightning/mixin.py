"""``DSGDMixin``: run DSGD inside Lightning's manual-optimization loop, around the user's own
``training_step``.

Per batch the mixin does one ``manual_backward`` of the loss the user's ``training_step``
returns and, at the end of each accumulation window, one ``LightningOptimizer.step()`` — so
``global_step``, ``max_steps``, step-based checkpoints and validation intervals behave as in
automatic mode, and the precision plugin unscales AMP gradients before DSGD sees them.

**The wiring cannot be bypassed.** ``DSGDMixin.__init_subclass__`` runs for every class that has
the mixin among its bases, wherever the mixin stands and wherever ``training_step`` is defined:

* the ``training_step`` the class resolves (its own, a base's, or one defined in a subclass
  later) is wrapped by `_driven`, which does the backward and the step after it; a nested
  call through ``super()`` runs unwrapped, so a step happens once per batch;
* ``configure_optimizers`` becomes the mixin's (DSGD from the settings) unless the DSGD class
  itself defines one, which must then return a ``DSGD``;
* ``automatic_optimization`` is the mixin's (manual) whatever the bases say;
* ``configure_callbacks`` adds `_DSGDLoop`, a callback that does the rest (checkpoint
  state, η checks, clipping, the fit-start line, removing DSGD's hooks when fit ends): callback
  hooks run whatever the module's own hooks do or forget to call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_dsgd.distributed import default_gatherer, default_reducer
from lightning_dsgd.lightning.loss import global_mean_loss
from lightning_dsgd.lightning.settings import DSGDSettings, as_settings
from lightning_dsgd.optimizer import DSGD

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch without FSDP2
    FSDPModule = ()  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # type checkers see the LightningModule the mixin is always combined with
    _Base = LightningModule
else:
    _Base = object


class DSGDMixin(_Base):
    """Mix into a LightningModule: ``class MyModel(DSGDMixin, MyModule)`` (any base order works;
    ``class Net(DSGDMixin, LightningModule)`` with its own ``training_step`` too).

    Settings come from the class attribute ``dsgd`` or the constructor argument ``dsgd=`` (a
    [DSGDSettings][lightning_dsgd.DSGDSettings] or a dict of its fields, also settable from a LightningCLI
    YAML as ``model.init_args.dsgd``).
    """

    dsgd: DSGDSettings = DSGDSettings()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _wire(cls)

    def __init__(self, *args: Any, dsgd: DSGDSettings | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # save_hyperparameters() in the user's __init__ also collects this frame's `dsgd`; keep it
        # out of the checkpoint's hyperparameters (an η-scheduler callable may not pickle).
        for hparams in (getattr(self, "_hparams", None), getattr(self, "_hparams_initial", None)):
            if hparams is not None:
                hparams.pop("dsgd", None)
        if dsgd is not None:
            self.dsgd = as_settings(dsgd)

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
        return cast(DSGD, self.trainer.optimizers[0])

    # ------------------------------------------------------------------ the training step
    def _dsgd_after_training_step(self, output: Any) -> Any:
        """Backward of the returned loss and, at the end of the window, one DSGD step."""
        loss = _loss_of(output)
        if loss is None:  # the user skipped this batch, as automatic optimization allows
            return output
        self._dsgd_batches_with_loss = getattr(self, "_dsgd_batches_with_loss", 0) + 1
        settings = as_settings(self.dsgd)
        dsgd = self.dsgd_optimizer
        dsgd.check_loss(loss)  # the certificate reads the loss's graph, before backward frees it
        window = settings.accumulate_grad_batches
        closes_window = self._closes_accumulation_window(window)
        with self._gradient_sync(enabled=closes_window):
            self.manual_backward(loss / window if window > 1 else loss)
        if closes_window:
            _check_scheduled_eta(dsgd, self.trainer.global_step)
            optimizer = self.optimizers()
            assert not isinstance(optimizer, list)  # DSGD is the only optimizer (checked at configure)
            steps_before = dsgd.steps_taken
            # The loss reaches DSGD.step through Lightning's precision plugin (full_batch compares
            # consecutive losses, so data-parallel ranks hand it the loss of the global batch).
            step_loss = global_mean_loss(self.trainer, loss) if settings.full_batch else loss.detach()
            optimizer.step(loss=step_loss)
            if dsgd.steps_taken == steps_before:
                scaler = getattr(self.trainer.precision_plugin, "scaler", None)
                if scaler is None:
                    raise RuntimeError(
                        f"DSGD.step did not run at step {self.trainer.global_step} and no GradScaler skipped it: "
                        "something between the Lightning optimizer and DSGD dropped the step. Use the plain "
                        "precision plugins (precision='32-true', 'bf16-mixed', '16-mixed')."
                    )
                dsgd.record_skip(
                    f"the GradScaler found inf/NaN in the float16 gradients (loss scale now {scaler.get_scale():g})"
                )
            optimizer.zero_grad()
            self._step_eta_schedulers("step", self.trainer.global_step)
        return output

    # ------------------------------------------------------------------ helpers
    def _closes_accumulation_window(self, window: int) -> bool:
        """True on the batch that ends an accumulation window (or the epoch), as Lightning decides
        in automatic mode."""
        if window == 1:
            return True
        trainer = self.trainer
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return ready % window == 0 or ready == trainer.num_training_batches

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the DDP all-reduce / FSDP2 reduce-scatter on the micro-batches inside a window."""
        if enabled:
            yield
            return
        fsdp_modules = [m for m in self.modules() if isinstance(m, FSDPModule)]
        for module in fsdp_modules:
            module.set_requires_gradient_sync(False, recurse=False)
        strategy = self.trainer.strategy
        block = getattr(strategy, "block_backward_sync", contextlib.nullcontext)
        try:
            with block():
                yield
        finally:
            for module in fsdp_modules:
                module.set_requires_gradient_sync(True, recurse=False)

    def _step_eta_schedulers(self, interval: str, count: int) -> None:
        """Manual optimization does not step schedulers: do it as automatic mode would."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or count % config.frequency != 0:
                continue
            config.scheduler.step()


# ---------------------------------------------------------------------- class wiring
def _wire(cls: Any) -> None:
    """Install the mixin's ``training_step`` driver, optimizer, manual mode and callback in
    ``cls`` itself, so that no base order or override can bypass them."""
    own = cls.__dict__
    step = getattr(cls, "training_step", None)
    if step is not None and not getattr(step, "_dsgd_driven", False):
        cls.training_step = _driven(step)
    configure = own.get("configure_optimizers")
    if configure is not None:
        cls.configure_optimizers = _checked_optimizers(configure)
    elif not getattr(getattr(cls, "configure_optimizers", None), "_dsgd", False):
        cls.configure_optimizers = _configure_dsgd
    if "automatic_optimization" not in own:
        cls.automatic_optimization = DSGDMixin.__dict__["automatic_optimization"]
    callbacks = getattr(cls, "configure_callbacks", None)
    if callbacks is not None and not getattr(callbacks, "_dsgd", False):
        cls.configure_callbacks = _with_dsgd_callbacks(callbacks)


def _driven(step: Callable[..., Any]) -> Callable[..., Any]:
    """``training_step`` followed by DSGD's backward and step; calls nested through ``super()``
    (an overriding ``training_step`` calling its base's) run plain."""

    @functools.wraps(step)
    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_dsgd_in_step", False):
            return step(self, *args, **kwargs)
        if not getattr(self, "_automatic_optimization", True):
            raise RuntimeError(
                f"{type(self).__name__} sets automatic_optimization = False and steps its own optimizers; "
                "DSGDMixin needs a training_step that returns the loss (as in automatic optimization)."
            )
        self._dsgd_in_step = True
        try:
            output = step(self, *args, **kwargs)
        finally:
            self._dsgd_in_step = False
        return self._dsgd_after_training_step(output)

    training_step._dsgd_driven = True  # type: ignore[attr-defined]
    return training_step


def _configure_dsgd(self: Any) -> Any:
    """DSGD built from the module's settings (and its η schedule, if any)."""
    settings = as_settings(self.dsgd)
    optimizer = DSGD(self, reduce_max=default_reducer(), gather=default_gatherer(), **settings.optimizer_kwargs())
    if settings.gradient_clip_val is not None and settings.gradient_clip_algorithm == "value":
        # Value clipping changes the gradient's direction: ⟨g, ρ(clip(g))⟩ ≥ ‖clip(g)‖² can fail.
        optimizer.external_uncertified_reason = (
            "gradient_clip_algorithm='value' changes the scored gradient's direction"
        )
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


_configure_dsgd._dsgd = True  # type: ignore[attr-defined]


def _checked_optimizers(configure: Callable[..., Any]) -> Callable[..., Any]:
    """A ``configure_optimizers`` written in a DSGD class: it must build DSGD (e.g. to declare a
    ``chain``); the data-parallel seams are added where it left them out."""

    @functools.wraps(configure)
    def configure_optimizers(self: Any) -> Any:
        result = configure(self)
        optimizer = result.get("optimizer") if isinstance(result, Mapping) else result
        if isinstance(optimizer, (list, tuple)) and len(optimizer) == 1:
            optimizer = optimizer[0]
        if not isinstance(optimizer, DSGD):
            raise TypeError(
                f"{type(self).__name__}.configure_optimizers returned {type(optimizer).__name__}, but DSGDMixin trains "
                "with DSGD: delete configure_optimizers (the mixin builds DSGD from the `dsgd` settings), or "
                "return DSGD(self, ...) from it (e.g. to declare chain=[...])."
            )
        optimizer.reduce_max = optimizer.reduce_max or default_reducer()
        optimizer.gather = optimizer.gather or default_gatherer()
        return result

    configure_optimizers._dsgd = True  # type: ignore[attr-defined]
    return configure_optimizers


def _with_dsgd_callbacks(configure: Callable[..., Any]) -> Callable[..., Any]:
    """The module's own callbacks plus `_DSGDLoop`; first, refuse what cannot work."""

    @functools.wraps(configure)
    def configure_callbacks(self: Any) -> Any:
        _check_before_fit(self)
        own = configure(self)
        callbacks = list(own) if isinstance(own, (list, tuple)) else ([] if own is None else [own])
        # An override calling super().configure_callbacks() must not add the loop twice.
        return [*(c for c in callbacks if not isinstance(c, _DSGDLoop)), _DSGDLoop()]

    configure_callbacks._dsgd = True  # type: ignore[attr-defined]
    return configure_callbacks


def _check_before_fit(module: Any) -> None:
    """Runs when fit starts, before any logger run exists: refuse the Trainer flags manual
    optimization cannot honour (naming the DSGD setting that does the job) and settings or models
    DSGD cannot train (by building DSGD once, without keeping it)."""
    trainer = module.trainer
    settings = as_settings(module.dsgd)
    if trainer.state.fn != "fit":  # validate / test / predict: DSGD does not run
        return
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
    if not getattr(module, "_automatic_optimization", True):
        raise RuntimeError(
            f"{type(module).__name__} sets automatic_optimization = False and steps its own optimizers; "
            "DSGDMixin needs a training_step that returns the loss (as in automatic optimization)."
        )
    if type(module).configure_model is LightningModule.configure_model and not _is_meta(module):
        DSGD(module, **settings.optimizer_kwargs()).remove_hooks()  # layers are final: check them now


def _is_meta(module: Any) -> bool:
    return any(p.is_meta for p in module.parameters())


def _check_scheduled_eta(dsgd: DSGD, step: int) -> None:
    for group in dsgd.param_groups:
        eta = float(group["lr"])
        if not 0.0 < eta < 2.0:
            raise ValueError(
                f"η reached {eta:g} at step {step} (layer {group['name']!r}): an η schedule must keep η in "
                "(0, 2), or DSGD stops moving. Give the schedule a floor (e.g. CosineAnnealingLR(eta_min=1e-3)) "
                "or end training (max_steps) before it reaches 0."
            )


class _DSGDLoop(Callback):
    """What DSGD needs around the loop, as callback hooks (they run whatever the module's own
    hooks do): checkpoint state, η from the settings on resume, clipping, an epoch without any
    step, the fit-start line and logger config, and DSGD's hooks removed when fit ends."""

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        """The optimizer state is restored by now: put DSGD's own state back on top of it."""
        dsgd = pl_module.dsgd_optimizer
        settings = as_settings(pl_module.dsgd)
        pending = getattr(pl_module, "_dsgd_checkpoint_state", None)
        if pending is not None:
            dsgd.load_extra_state_dict(pending)
            pl_module._dsgd_checkpoint_state = None
            _resume_eta(trainer, dsgd, settings)
        pl_module._dsgd_batches_with_loss = 0
        _announce(trainer, pl_module, dsgd, settings)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """DSGD's own state also goes here: FSDP2's distributed optimizer checkpoint keeps only
        torch's ``state`` and ``param_groups``."""
        if trainer.optimizers and isinstance(trainer.optimizers[0], DSGD):
            checkpoint["dsgd"] = pl_module.dsgd_optimizer.extra_state_dict()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        pl_module._dsgd_checkpoint_state = checkpoint.get("dsgd")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are unscaled here (AMP) and DSGD has not scored them yet: clip now."""
        settings = as_settings(pl_module.dsgd)
        if settings.gradient_clip_val is not None:
            pl_module.clip_gradients(
                optimizer,
                gradient_clip_val=settings.gradient_clip_val,
                gradient_clip_algorithm=settings.gradient_clip_algorithm,
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.num_training_batches and not getattr(pl_module, "_dsgd_batches_with_loss", 0):
            raise RuntimeError(
                f"Epoch {trainer.current_epoch} ran {trainer.num_training_batches} batches and training_step returned "
                "no loss for any of them, so DSGD never stepped. Return the loss from training_step (a Tensor or "
                "{'loss': ...}); None skips a batch."
            )
        pl_module._dsgd_batches_with_loss = 0
        pl_module._step_eta_schedulers("epoch", trainer.current_epoch + 1)

    def teardown(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        _remove_hooks(trainer)

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        _remove_hooks(trainer)


def _remove_hooks(trainer: Trainer) -> None:
    """After fit the module carries no DSGD hook (it pickles as without DSGD)."""
    for optimizer in trainer.optimizers:
        if isinstance(optimizer, DSGD):
            optimizer.remove_hooks()


def _resume_eta(trainer: Trainer, dsgd: DSGD, settings: DSGDSettings) -> None:
    """The settings' η wins over the checkpoint's unless an η schedule drives it (then the
    schedule resumes where it was); either way, a difference is said."""
    saved = [float(group["lr"]) for group in dsgd.param_groups]
    if trainer.lr_scheduler_configs:
        if any(
            abs(eta - settings.eta) > 0 for eta in getattr(trainer.lr_scheduler_configs[0].scheduler, "base_lrs", [])
        ):
            rank_zero_warn(
                f"DSGDSettings(eta={settings.eta}) differs from the η schedule saved in the checkpoint; the schedule "
                f"resumes from the checkpoint (η now {saved[0]:g}). Start a new run to change the schedule's η."
            )
        return
    if any(eta != settings.eta for eta in saved):
        rank_zero_warn(
            f"The checkpoint was trained with η={saved[0]:g}; DSGDSettings(eta={settings.eta}) wins from now on."
        )
    for group in dsgd.param_groups:
        group["lr"] = settings.eta


def _announce(trainer: Trainer, pl_module: Any, dsgd: DSGD, settings: DSGDSettings) -> None:
    """One info line, and the settings and layer names in every logger's config."""
    reason = dsgd.uncertified_reason
    certificate = (
        "certified while the loss is the mean cross-entropy of the chain's logits"
        if reason is None
        else f"not certified: {reason}"
    )
    rank_zero_info(
        f"DSGD: {len(dsgd.layers)} layers {dsgd.layer_names}, norm={dsgd.geometry.name!r}, "
        f"constants={dsgd.constants_mode!r}, selection={dsgd.selection!r}; {certificate}."
    )
    config = {"dsgd": {**settings.describe(), "layers": dsgd.layer_names, "certified": reason is None}}
    if reason is not None:
        config["dsgd"]["not_certified_reason"] = reason
    for logger in trainer.loggers:
        logger.log_hyperparams(config)


def _loss_of(output: Any) -> Tensor | None:
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    raise TypeError(
        "DSGDMixin needs training_step to return the loss: a Tensor, a mapping with a 'loss' key, or None "
        f"to skip the batch; got {type(output).__name__}."
    )


_DYNAMIC: dict[type, type] = {}


def with_dsgd(module: LightningModule, settings: DSGDSettings | Mapping[str, Any] | None = None) -> LightningModule:
    """Turn an existing LightningModule instance into a DSGD one in place (its class becomes a
    subclass with [DSGDMixin][lightning_dsgd.DSGDMixin] first, which pickles as its original class plus
    the mixin) and return it."""
    if not isinstance(module, DSGDMixin):
        cls = type(module)
        if cls not in _DYNAMIC:
            _DYNAMIC[cls] = type(
                cls.__name__, (DSGDMixin, cls), {"__module__": cls.__module__, "__reduce_ex__": _reduce_with_dsgd}
            )
        module.__class__ = _DYNAMIC[cls]
    if settings is not None:
        module.dsgd = as_settings(settings)  # type: ignore[attr-defined]
    return module


def _reduce_with_dsgd(self: Any, protocol: int) -> tuple:
    base = type(self).__mro__[2]  # (dynamic class, DSGDMixin, the original class, …)
    return _rebuild_with_dsgd, (base, self.__getstate__())


def _rebuild_with_dsgd(base: type, state: dict[str, Any]) -> Any:
    module = base.__new__(base)
    module.__setstate__(state)
    return with_dsgd(module)
