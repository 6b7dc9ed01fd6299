"""``DSGDMonitor``: DSGD's decisions in any Lightning logger, in W&B, and in a picture.

It reads the optimizer's record of each step ([StepRecord][lightning_dsgd.StepRecord]) and never
recomputes it. Every key it logs is in the table of the monitor guide (``docs/guide/callback.md``,
tested against this module). In short, with the default ``logging_interval=None``:

* at every step Lightning logs (``Trainer(log_every_n_steps=...)``), with ``LightningModule.log``, so
  in the same row as ``training_step``'s metrics of that step, with ``epoch``: ``dsgd/layer`` (index
  of the chosen layer, ``-1`` on a skipped step), ``dsgd/stationarity`` (``max_i ‖g_i‖_* / √L_i``),
  ``dsgd/guaranteed_decrease`` (a guarantee only where ``dsgd/certified`` is 1, else an estimate),
  ``dsgd/certified``, ``dsgd/skipped``, and per layer, by name, ``dsgd_layers/chosen/<layer>`` (1 for
  the chosen layer), ``dsgd_layers/score/<layer>``, ``dsgd_layers/constant/<layer>`` (``L_i``),
  ``dsgd_layers/dual_norm/<layer>``; W&B also gets the chosen layer's name, ``dsgd/layer_name``;
* in full-batch training: ``dsgd/realized_decrease`` ``f(w_t) − f(w_{t+1})`` of the logged step
  ``t`` and ``dsgd/bound_violations``, known one step later and sent then at step ``t`` (a row of
  their own, with ``epoch``);
* at each epoch's last step: ``dsgd_epoch/frequency/<layer>``, how many steps chose each layer (a
  [LayerSelectionFrequency][lightning_dsgd.LayerSelectionFrequency] summed over ranks); in W&B also
  a table and a histogram of the choices.

``logging_interval="step"`` logs only the per-step keys; ``"epoch"`` only, at each epoch's end, the
per-epoch keys and the per-step keys of the epoch's last step (one row, with ``epoch``). At the end
of fit, rank 0 saves ``dsgd_layers.png`` (matplotlib, optional; see
[save_history_png][lightning_dsgd.lightning.plot.save_history_png]).

**Observe-only mode.** When the model is trained by another optimizer (SGD, Adam, …), at the
logging interval the monitor computes what DSGD would choose on the gradients already there, with
[DSGD.score][lightning_dsgd.optimizer.DSGD.score] of a DSGD built on the same module (weights are
never touched): a diagnostic of which layer limits progress. It logs the same keys (counts are over
scored steps only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_dsgd.distributed import default_reducer
from lightning_dsgd.lightning.loss import global_mean_loss
from lightning_dsgd.lightning.metrics import LayerSelectionFrequency
from lightning_dsgd.lightning.plot import History, require_matplotlib, save_history_png
from lightning_dsgd.lightning.settings import DSGDSettings
from lightning_dsgd.optimizer import DSGD, StepRecord

PNG_NAME = "dsgd_layers.png"


@dataclass
class _Pending:
    """The last step taken, until the next one tells its realized decrease."""

    loss: Tensor | None  # the full-batch loss (full_batch=True)
    guaranteed: Tensor  # its guaranteed decrease
    step: int | None  # its logger step, if it was logged
    index: int | None  # its entry in the history, if it was logged
    epoch: int  # the epoch it was taken in

    def state(self) -> tuple[float | None, float, int | None, int | None]:
        return (None if self.loss is None else float(self.loss), float(self.guaranteed), self.step, self.index)

    @classmethod
    def from_state(cls, state: tuple, epoch: int, device: torch.device) -> _Pending:
        loss, guaranteed, step, index = state
        loss = None if loss is None else torch.tensor(loss, device=device)
        return cls(loss, torch.tensor(guaranteed, device=device), step, index, epoch)


class _Observer:
    """Observe-only mode: a DSGD built on the module scores (never steps) the gradients another
    optimizer is about to use, on the steps that will be logged only."""

    def __init__(self, optimizer: DSGD) -> None:
        self.optimizer = optimizer
        self._scores_this_batch = False
        self._batch = -1
        self._record: StepRecord | None = None

    def batch_start(self, scores: bool) -> None:
        """Record input norms in this batch's forward passes only if its step is scored."""
        self._scores_this_batch = scores
        self.optimizer.record_input_norms(scores)

    def before_optimizer_step(self, batch: int) -> None:
        """Gradients are final (unscaled) here: score them once per batch (several optimizers may step)."""
        if batch == self._batch:
            return
        self._batch = batch
        if self._scores_this_batch:
            self._record = self.optimizer.score()
        else:  # the next score must see only its own step's forward passes
            self.optimizer.discard_input_norms()

    def take(self) -> StepRecord | None:
        """This batch's scored record (once), or None."""
        record, self._record = self._record, None
        return record


class DSGDMonitor(Callback):
    """Log DSGD's chosen layer and bounds (the module docstring lists every key).

    Args:
        logging_interval: as ``LearningRateMonitor``'s: ``"step"``: the per-step keys at the steps
            Lightning logs; ``"epoch"``: at each epoch's end, the per-epoch keys and the per-step
            keys of the epoch's last step; ``None`` (default): both, each at its own interval.
        full_batch: every batch is the same full data set, so ``loss_t − loss_{t+1}`` (the losses
            ``training_step`` returns, averaged over ranks) is the realized decrease of step
            ``t``: log it and count the steps where it is below the guaranteed decrease. Only
            meaningful then; ignored in observe-only mode. Not needed when the optimizer's
            record already carries ``realized_decrease`` (``DSGD(full_batch=True)`` given the
            loss): that value is used.
        observe: with an optimizer other than DSGD, compute what DSGD would choose (``True``:
            the certified constants, ``DSGDSettings(constants="data")``, since adaptive constants
            learn only from DSGD's own steps; or the settings to score with; ``False``: log nothing).
        plot: save ``dsgd_layers.png`` at the end of fit: ``None`` when matplotlib is installed,
            ``True`` always (an ``ImportError`` at setup without matplotlib), ``False`` never.
        dirpath: folder of the PNG; default ``trainer.log_dir`` (or ``default_root_dir``).
        decrease_rtol, decrease_atol: a step violates the bound when
            ``realized < guaranteed·(1 − rtol) − atol`` (float32 losses round at ~1e-7·|f|).
    """

    def __init__(
        self,
        logging_interval: Literal["step", "epoch"] | None = None,
        full_batch: bool = False,
        observe: bool | DSGDSettings = True,
        plot: bool | None = None,
        dirpath: str | None = None,
        decrease_rtol: float = 1e-4,
        decrease_atol: float = 1e-6,
    ) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise ValueError(
                f"DSGDMonitor(logging_interval={logging_interval!r}) is not an interval: use 'step' (every step "
                "Lightning logs), 'epoch' (each epoch's end) or None (both, the default)."
            )
        self.logging_interval = logging_interval
        self.full_batch = full_batch
        self.observe = DSGDSettings(constants="data") if observe is True else (observe or None)
        self.plot = plot
        self.dirpath = dirpath
        self.decrease_rtol = decrease_rtol
        self.decrease_atol = decrease_atol

        self.history = History()
        self.epoch_counts: list[list[int]] = []  # the synced per-epoch counts, on every rank
        self.png_path: Path | None = None
        self.selection: LayerSelectionFrequency | None = None
        self.layer_names: list[str] = []
        self._optimizer: DSGD | None = None  # the trainer's DSGD, or the observer's
        self._observer: _Observer | None = None  # observe-only mode
        self._seen: StepRecord | None = None
        self._last: tuple[StepRecord, int] | None = None  # this epoch's latest record and its step
        self._violations: Tensor | None = None
        self._previous: _Pending | None = None
        self._loaded: dict[str, Any] = {}
        self._plot_enabled = False

    @property
    def bound_violations(self) -> int:
        """Steps whose realized decrease fell short of the guaranteed one (full-batch training)."""
        return 0 if self._violations is None else int(self._violations)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.plot is True:
            require_matplotlib()
        self._plot_enabled = self.plot is True or (self.plot is None and _matplotlib_available())

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find what to read (after checkpoint restore): the trainer's DSGD, or an observer."""
        self._optimizer, self._observer = None, None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if isinstance(optimizer, DSGD):
            self._optimizer = optimizer
        elif self.observe is not None:
            kwargs = dict(self.observe.optimizer_kwargs(), nonfinite="skip")
            try:
                self._optimizer = DSGD(pl_module, reduce_max=default_reducer(), **kwargs)
            except ValueError as error:
                rank_zero_warn(f"DSGDMonitor: observe-only mode is off, DSGD cannot score this model. {error}")
                return
            self._observer = _Observer(self._optimizer)
            if self.full_batch:
                rank_zero_warn(
                    "DSGDMonitor(full_batch=True) is ignored in observe-only mode: DSGD does not take the step."
                )
        else:
            rank_zero_warn("DSGDMonitor: the optimizer is not DSGD and observe=False, so there is nothing to log.")
            return
        self.layer_names = self._optimizer.layer_names
        self.selection = LayerSelectionFrequency(len(self.layer_names)).to(pl_module.device)
        saved = self._loaded.get("selection_counts")
        if saved and trainer.is_global_zero:  # this epoch's choices before the checkpoint; rank 0 counts
            counts = torch.tensor(saved)
            self.selection.update(torch.repeat_interleave(torch.arange(len(counts)), counts))
        self._violations = torch.tensor(self._loaded.get("violations", 0), device=pl_module.device)
        previous = self._loaded.get("previous")
        if previous is not None:
            self._previous = _Pending.from_state(previous, self._loaded.get("previous_epoch", 0), pl_module.device)
        self._loaded = {}
        if trainer.is_global_zero:
            for logger in _wandb_loggers(trainer):
                _define_wandb_metrics(logger, self.layer_names)

    # ------------------------------------------------------------------ every step
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Observe-only mode: decide now whether this step is scored (it will be logged), so that
        the input norms are recorded in its forward passes only."""
        if self._observer is not None:
            epoch_end = self.logging_interval == "epoch" and _last_step_of_epoch(trainer)
            self._observer.batch_start(self._logs_step(trainer) or epoch_end)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Observing: the certificate of the scored step needs the loss's graph (DSGD.check_loss)."""
        if self._observer is not None:
            self._observer.optimizer.check_loss(loss)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Observe-only mode: gradients are final (unscaled) here; score them at logging steps."""
        if self._observer is not None:
            self._observer.before_optimizer_step(trainer.fit_loop.epoch_loop._batches_that_stepped)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._optimizer is None:
            return
        observing = self._observer is not None
        if self._observer is not None:
            record = self._observer.take()
            if record is None:
                return
        else:
            record = self._optimizer.last_step
            if record is None or record is self._seen:  # no step on this batch (accumulation)
                return
            self._seen = record
        logged = self.logging_interval != "epoch" if observing else self._logs_step(trainer)
        if trainer.is_global_zero:  # every rank chose the same: count once
            for layer in record.layers or ((record.layer,) if record.layer is not None else ()):
                self.selection.update(layer)  # type: ignore[union-attr]
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._last = (record, step)
        loss = self._full_batch_loss(trainer, outputs) if self.full_batch and not observing else None
        if not observing:
            self._realized_decrease(trainer, record, loss)
        if logged:
            self._log_step(trainer, pl_module, record, step)
        if not observing:
            index = len(self.history.steps) - 1 if logged else None
            guaranteed = record.guaranteed_decrease.detach()
            self._previous = _Pending(loss, guaranteed, step if logged else None, index, trainer.current_epoch)

    def _logs_step(self, trainer: Trainer) -> bool:
        return self.logging_interval != "epoch" and _should_log(trainer)

    def _step_metrics(self, record: StepRecord, step: int) -> dict[str, float]:
        """The per-step keys of ``record`` (one host synchronisation), and its entry in the history."""
        n = len(self.layer_names)
        values = torch.cat(
            [
                record.stationarity.reshape(1),
                record.guaranteed_decrease.reshape(1),
                record.scores.reshape(-1),
                record.constants.reshape(-1),
                record.dual_norms.reshape(-1),
            ]
        ).tolist()  # one host synchronisation for everything
        stationarity, guaranteed = values[0], values[1]
        scores, constants, dual_norms = values[2 : 2 + n], values[2 + n : 2 + 2 * n], values[2 + 2 * n :]
        chosen = set(record.layers or ((record.layer,) if record.layer is not None else ()))
        metrics = {
            "dsgd/layer": float(-1 if record.layer is None else record.layer),
            "dsgd/stationarity": stationarity,
            "dsgd/guaranteed_decrease": guaranteed,
            "dsgd/certified": float(record.certified),
            "dsgd/skipped": float(record.skipped),
        }
        for i, (name, score, constant, dual_norm) in enumerate(
            zip(self.layer_names, scores, constants, dual_norms, strict=True)
        ):
            metrics[f"dsgd_layers/chosen/{name}"] = float(i in chosen)
            metrics[f"dsgd_layers/score/{name}"] = score
            metrics[f"dsgd_layers/constant/{name}"] = constant
            metrics[f"dsgd_layers/dual_norm/{name}"] = dual_norm
        self.history.append(step, record.layer, record.certified, stationarity, guaranteed, constants)
        return metrics

    def _log_step(self, trainer: Trainer, pl_module: LightningModule, record: StepRecord, step: int) -> None:
        """Through ``LightningModule.log``: Lightning sends them with ``training_step``'s metrics of
        this step, in one row with ``epoch``. CPU tensors: no device copies, no further syncs."""
        metrics = self._step_metrics(record, step)
        values = {key: torch.tensor(value) for key, value in metrics.items()}
        pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True, sync_dist=False)
        if record.layer_name is not None:  # W&B's history also takes strings
            for logger in _wandb_loggers(trainer):
                logger.log_metrics({"dsgd/layer_name": record.layer_name}, step=step)

    # ------------------------------------------------------------------ full batch: realized decrease
    def _realized_decrease(self, trainer: Trainer, record: StepRecord, loss: Tensor | None) -> None:
        """The previous step's realized decrease, known now: from the record, or (``full_batch``)
        from the previous and the current loss. Count it, and log it if that step was logged."""
        if self._previous is None:
            return
        realized = record.realized_decrease  # the optimizer's own, where it records it
        previous_loss = self._previous.loss
        if realized is None and previous_loss is not None and loss is not None:
            realized = previous_loss.to(loss.dtype) - loss
        if realized is not None:
            self._close_previous(trainer, realized)

    def _full_batch_loss(self, trainer: Trainer, outputs: Any) -> Tensor | None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            return None
        return global_mean_loss(trainer, loss)  # the full data set is split over the ranks

    def _close_previous(self, trainer: Trainer, realized: Tensor) -> None:
        previous = self._previous
        assert previous is not None
        step, index = previous.step, previous.index
        threshold = previous.guaranteed.to(realized.dtype) * (1.0 - self.decrease_rtol) - self.decrease_atol
        self._violations = self._violations + (realized < threshold).long()  # type: ignore[operator]
        if step is None:
            return
        realized_value = realized.item()
        self.history.realized[index] = realized_value  # type: ignore[index]
        metrics = {"dsgd/realized_decrease": realized_value, "dsgd/bound_violations": self.bound_violations}
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        _send(trainer, {**metrics, "epoch": previous.epoch}, step)

    # ------------------------------------------------------------------ per epoch, end of fit
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.selection is None or self._optimizer is None:
            return
        if not self.selection.update_called:  # ranks > 0 record nothing, but must join the sync
            self.selection.update(torch.empty(0, dtype=torch.long, device=self.selection.counts.device))
        counts = self.selection.compute().tolist()  # a collective: on every rank, outside rank-zero code
        self.selection.reset()
        self.epoch_counts.append(counts)
        last, self._last = self._last, None
        if self.logging_interval == "step":
            return
        step = max(trainer.fit_loop.epoch_loop._batches_that_stepped - 1, 0)  # as Lightning's epoch metrics
        metrics: dict[str, Any] = {"epoch": trainer.current_epoch}
        wandb_extra: dict[str, Any] = {}
        if self.logging_interval == "epoch" and last is not None:  # the epoch's last step, in the same row
            record, step = last
            metrics.update(self._step_metrics(record, step))
            trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
            if record.layer_name is not None:
                wandb_extra["dsgd/layer_name"] = record.layer_name
            if self._observer is None and self._previous is not None:  # its realized decrease is logged when known
                self._previous.step, self._previous.index = step, len(self.history.steps) - 1
        metrics.update({f"dsgd_epoch/frequency/{name}": c for name, c in zip(self.layer_names, counts, strict=True)})
        _send(trainer, metrics, step, wandb_extra)
        if trainer.is_global_zero:
            for logger in _wandb_loggers(trainer):
                _log_wandb_epoch(logger, self.layer_names, counts, trainer.current_epoch, step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = self.dirpath or trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: all ranks
        if self._plot_enabled and trainer.is_global_zero and self.history.steps:
            observing = self._observer is not None
            title = "DSGD (observing " + type(trainer.optimizers[0]).__name__ + ")" if observing else "DSGD"
            every_layer = self._optimizer is not None and self._optimizer.layers_per_step > 1
            path = Path(directory) / PNG_NAME
            self.png_path = save_history_png(self.history, self.layer_names, path, title, every_layer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._observer is not None:
            self._observer.optimizer.remove_hooks()
        self._optimizer, self._observer, self._seen = None, None, None

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        counts = self.selection.counts.tolist() if self.selection is not None else None
        return {
            "history": self.history.state_dict(),
            "epoch_counts": [list(c) for c in self.epoch_counts],
            "selection_counts": counts,  # this epoch so far; rank 0 holds them all
            "violations": self.bound_violations,
            "previous": None if self._previous is None else self._previous.state(),
            "previous_epoch": 0 if self._previous is None else self._previous.epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = History(**state_dict["history"])
        self.epoch_counts = [list(c) for c in state_dict["epoch_counts"]]
        self._loaded = {key: state_dict[key] for key in ("selection_counts", "violations", "previous")}
        self._loaded["previous_epoch"] = state_dict.get("previous_epoch", 0)


# ---------------------------------------------------------------------- helpers
def _should_log(trainer: Trainer) -> bool:
    """Lightning's own decision whether this training step's metrics reach the loggers."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "should_update_logs"):
        return bool(connector.should_update_logs)
    every = trainer.log_every_n_steps
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
    return every > 0 and (step % every == 0 or trainer.should_stop)


def _last_step_of_epoch(trainer: Trainer) -> bool:
    """Whether the batch starting now is the epoch's last one, or the run's last step (``max_steps``)."""
    if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return True
    return 0 < trainer.max_steps <= trainer.global_step + 1


def _send(trainer: Trainer, metrics: dict[str, Any], step: int, wandb_extra: dict[str, Any] | None = None) -> None:
    """Straight to every Lightning logger (they write on rank 0 only), as ``LearningRateMonitor`` does:
    for the keys that cannot join the step's row (known later, or at the epoch's end)."""
    for logger in trainer.loggers:
        if wandb_extra and isinstance(logger, WandbLogger):
            logger.log_metrics({**metrics, **wandb_extra}, step=step)  # W&B history also takes strings
        else:
            logger.log_metrics(metrics, step=step)


def _matplotlib_available() -> bool:
    try:
        require_matplotlib()
    except ImportError:
        return False
    return True


def _wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _define_wandb_metrics(logger: WandbLogger, layer_names: list[str]) -> None:
    """Bind every DSGD key to the trainer's step (W&B's own ``_step`` counts log calls, not steps)."""
    run = logger.experiment
    for pattern in ("dsgd/*", "dsgd_layers/*", "dsgd_epoch/*"):
        run.define_metric(pattern, step_metric="trainer/global_step", step_sync=True)
    run.define_metric("dsgd/stationarity", step_metric="trainer/global_step", summary="min,last")
    run.define_metric("dsgd/bound_violations", step_metric="trainer/global_step", summary="max")
    run.config.update({"dsgd/layer_names": layer_names}, allow_val_change=True)


def _log_wandb_epoch(logger: WandbLogger, names: list[str], counts: list[int], epoch: int, step: int) -> None:
    """One table (one media file) and one histogram of this epoch's choices."""
    import wandb

    total = sum(counts) or 1
    rows = [[epoch, i, name, count, count / total] for i, (name, count) in enumerate(zip(names, counts, strict=True))]
    table = wandb.Table(columns=["epoch", "layer", "name", "count", "share"], data=rows)
    histogram = wandb.Histogram(np_histogram=(counts, [i - 0.5 for i in range(len(names) + 1)]))
    logger.log_metrics({"dsgd_epoch/selection": table, "dsgd_epoch/selection_histogram": histogram}, step=step)
