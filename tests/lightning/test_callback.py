"""DSGDMonitor: the exact keys, values and steps it logs (recording logger, CSV, a real offline W&B
run), full-batch realized decrease, observe-only mode, resume, the picture, and life without wandb
or matplotlib; and a 2-process DDP run (tests/lightning/monitor_run.py)."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers.lightning_models import Classifier, DSGDClassifier, RecordChoices
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from test_mixin import Overflow, fp16_trainer, trainer
from torch import nn

from lightning_dsgd import DSGD, DSGDSettings, LossBounds
from lightning_dsgd.lightning.callback import DSGDMonitor
from lightning_dsgd.lightning.metrics import LayerSelectionFrequency
from lightning_dsgd.lightning.plot import History, decrease_series

NAMES = ["net.0", "net.2", "net.4"]
STEP_KEYS = {"dsgd/layer", "dsgd/stationarity", "dsgd/guaranteed_decrease", "dsgd/certified", "dsgd/skipped"} | {
    f"dsgd_layers/{quantity}/{name}" for quantity in ("chosen", "score", "constant", "dual_norm") for name in NAMES
}
EPOCH_KEYS = {f"dsgd_epoch/frequency/{name}" for name in NAMES}
RANDOM = DSGDSettings(selection="random", seed=3)  # varied choices, so the counts say something


class RecordingLogger(Logger):
    """Keeps every ``log_metrics(metrics, step)`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, Any], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def steps_of(self, key: str) -> list[int | None]:
        return [step for metrics, step in self.calls if key in metrics]

    def calls_with(self, key: str) -> list[tuple[dict[str, Any], int | None]]:
        return [(metrics, step) for metrics, step in self.calls if key in metrics]


def dsgd_part(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if key.startswith("dsgd")}


def expected_step_metrics(record) -> dict[str, Any]:
    metrics = {
        "dsgd/layer": -1 if record.layer is None else record.layer,
        "dsgd/stationarity": record.stationarity.item(),
        "dsgd/guaranteed_decrease": record.guaranteed_decrease.item(),
        "dsgd/certified": int(record.certified),
        "dsgd/skipped": int(record.skipped),
    }
    for i, name in enumerate(NAMES):
        metrics[f"dsgd_layers/chosen/{name}"] = int(i == record.layer)
        metrics[f"dsgd_layers/score/{name}"] = record.scores[i].item()
        metrics[f"dsgd_layers/constant/{name}"] = record.constants[i].item()
        metrics[f"dsgd_layers/dual_norm/{name}"] = record.dual_norms[i].item()
    return metrics


def counts_per_epoch(layers: list[int], steps_per_epoch: int) -> list[list[int]]:
    epochs = [layers[k : k + steps_per_epoch] for k in range(0, len(layers), steps_per_epoch)]
    return [[epoch.count(i) for i in range(len(NAMES))] for epoch in epochs]


# ---------------------------------------------------------------------------- exact keys, values, steps
@pytest.mark.parametrize(("every", "logged"), [(1, list(range(12))), (3, [2, 5, 8, 11])])
def test_logs_exact_keys_values_and_steps(tmp_path, every, logged):
    logger, record, monitor = RecordingLogger(), RecordChoices(), DSGDMonitor(plot=False)
    t = trainer(tmp_path, max_steps=12, logger=logger, log_every_n_steps=every, callbacks=[record, monitor])
    t.fit(DSGDClassifier(dsgd=RANDOM))

    steps = logger.steps_of("dsgd/stationarity")
    assert steps == logged == logger.steps_of("train_loss")  # the steps Lightning logs the user's metrics at
    for metrics, step in logger.calls_with("dsgd/stationarity"):
        # In the same call (one CSV row) as training_step's metrics of that step, with the epoch:
        assert "train_loss" in metrics and metrics["epoch"] == step // 8
        assert dsgd_part(metrics) == expected_step_metrics(record.records[step])  # record k is step k

    # 8 batches per epoch: epoch 0 ends at step 7, the second (stopped by max_steps) at step 11.
    epoch_calls = logger.calls_with("dsgd_epoch/frequency/net.0")
    assert [step for _, step in epoch_calls] == [7, 11]
    expected = counts_per_epoch(record.layers, 8)
    assert len(set(record.layers)) > 1
    for epoch, ((metrics, _), counts) in enumerate(zip(epoch_calls, expected, strict=True)):
        frequencies = {f"dsgd_epoch/frequency/{name}": c for name, c in zip(NAMES, counts, strict=True)}
        assert metrics == {**frequencies, "epoch": epoch}
    assert monitor.epoch_counts == expected
    # Nothing else: every DSGD call is one of these two kinds.
    dsgd_calls = [dsgd_part(m) for m, _ in logger.calls if any(k.startswith("dsgd") for k in m)]
    assert all(set(m) in (STEP_KEYS, EPOCH_KEYS) for m in dsgd_calls)
    assert len(dsgd_calls) == len(logged) + 2
    assert t.callback_metrics["dsgd/stationarity"].item() == record.records[logged[-1]].stationarity.item()


def test_logs_nothing_at_steps_lightning_does_not_log(tmp_path):
    logger = RecordingLogger()
    t = trainer(tmp_path, max_steps=4, logger=logger, log_every_n_steps=0, callbacks=[DSGDMonitor(plot=False)])
    t.fit(DSGDClassifier())
    assert logger.steps_of("dsgd/layer") == [] and logger.steps_of("dsgd_epoch/frequency/net.4") == [3]


def test_csv_logger(tmp_path):
    t = trainer(tmp_path, max_steps=6, logger=CSVLogger(tmp_path), log_every_n_steps=2, callbacks=[DSGDMonitor()])
    record = RecordChoices()
    t.callbacks.append(record)
    t.fit(DSGDClassifier(dsgd=RANDOM))
    with open(Path(t.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["dsgd/layer"]]
    assert [int(row["step"]) for row in rows] == [1, 3, 5]
    assert [float(row["dsgd/layer"]) for row in rows] == [record.layers[k] for k in (1, 3, 5)]
    # The chosen layer by name, in the row of training_step's loss, with the epoch:
    for row, k in zip(rows, (1, 3, 5), strict=True):
        assert row["train_loss"] and row["epoch"] == str(k // 8)
        chosen = [name for name in NAMES if float(row[f"dsgd_layers/chosen/{name}"]) == 1]
        assert chosen == [NAMES[record.layers[k]]]
    if importlib.util.find_spec("matplotlib") is not None:  # the picture lands next to the metrics
        assert (Path(t.log_dir) / "dsgd_layers.png").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_csv_rows_on_a_gpu(tmp_path):
    """On CUDA the step keys (CPU tensors after one host sync) still join training_step's row."""
    t = trainer(tmp_path, accelerator="gpu", max_steps=4, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    t.callbacks.append(DSGDMonitor(plot=False))
    t.fit(DSGDClassifier(dsgd=RANDOM))
    with open(Path(t.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["dsgd/stationarity"]]
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    assert all(row["train_loss"] and row["epoch"] == "0" for row in rows)
    assert all(sum(float(row[f"dsgd_layers/chosen/{name}"]) for name in NAMES) == 1 for row in rows)


def test_works_without_wandb_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ImportError):
        import wandb  # noqa: F401
    t = trainer(tmp_path, max_steps=3, logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[DSGDMonitor()])
    t.fit(DSGDClassifier())
    assert "dsgd/layer" in (Path(t.log_dir) / "metrics.csv").read_text().splitlines()[0]


def test_asking_for_the_picture_without_matplotlib_fails_early(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        trainer(tmp_path, max_steps=1, callbacks=[DSGDMonitor(plot=True)]).fit(DSGDClassifier())
    monitor = DSGDMonitor()  # plot=None: no matplotlib, no picture, no error
    trainer(tmp_path, max_steps=2, log_every_n_steps=1, callbacks=[monitor]).fit(DSGDClassifier())
    assert monitor.png_path is None and len(monitor.history.steps) == 2


def test_a_skipped_step_is_logged_as_skipped_without_a_layer(tmp_path):
    logger, monitor = RecordingLogger(), DSGDMonitor(plot=False)
    t = fp16_trainer(tmp_path, max_steps=4, logger=logger, log_every_n_steps=1, callbacks=[monitor])
    t.fit(Overflow())  # the GradScaler skips step 2 (inf loss)
    calls = [metrics for metrics, _ in logger.calls_with("dsgd/skipped")]
    assert [m["dsgd/skipped"] for m in calls] == [0, 0, 1, 0]
    # 16-mixed: the gradient is the autocast forward's, so no step is certified (precision guide)
    assert [m["dsgd/certified"] for m in calls] == [0, 0, 0, 0]
    assert calls[2]["dsgd/layer"] == -1 and all(calls[k]["dsgd/layer"] >= 0 for k in (0, 1, 3))
    assert not any(calls[2][f"dsgd_layers/chosen/{name}"] for name in NAMES)
    assert math.isnan(calls[2]["dsgd_layers/score/net.0"])
    assert sum(monitor.epoch_counts[0]) == 3 and monitor.history.layers[2] is None


# ---------------------------------------------------------------------------- the key table of the guide
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide" / "callback.md"


def documented_keys() -> dict[str, str]:
    """``key -> "every logger" | "W&B only"`` from the one table of docs/guide/callback.md."""
    rows = re.findall(r"^\| `([^`]+)` \| (every logger|W&B only) \|", GUIDE.read_text(), flags=re.M)
    assert len(rows) == len(set(key for key, _ in rows)), "a key is in the table twice"
    return dict(rows)


def recording_wandb_logger() -> Logger:
    """A ``WandbLogger`` (the monitor's W&B branch runs) that records its calls instead of a run."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    class Run:
        config = SimpleNamespace(update=lambda *args, **kwargs: None)

        def define_metric(self, *args: Any, **kwargs: Any) -> None:
            pass

    class RecordingWandbLogger(WandbLogger):
        calls = RecordingLogger.calls_with

        @property
        def experiment(self) -> Any:
            return Run()

        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            self.calls.append((dict(metrics), step))

    logger = RecordingWandbLogger(offline=True)
    logger.calls = []
    return logger


def logged_keys(calls: list[tuple[dict[str, Any], int | None]]) -> set[str]:
    keys = {key for metrics, _ in calls for key in metrics if key.startswith("dsgd")}
    return {re.sub(r"/net\.\d+$", "/<layer>", key) for key in keys}


def test_the_guide_documents_exactly_the_keys_the_monitor_logs(tmp_path):
    """Every key logged (a full-batch DSGD run reaches every kind) is in the guide's table with
    the loggers it goes to, and every key of the table is logged."""
    plain, wandb_logger = RecordingLogger(), recording_wandb_logger()
    monitor = DSGDMonitor(full_batch=True, plot=False)
    t = trainer(tmp_path, max_epochs=3, logger=[plain, wandb_logger], log_every_n_steps=1, callbacks=[monitor])
    t.fit(DSGDClassifier(batch_size=64))
    everywhere, in_wandb = logged_keys(plain.calls), logged_keys(wandb_logger.calls)
    table = documented_keys()
    assert everywhere == {key for key, where in table.items() if where == "every logger"}
    assert in_wandb - everywhere == {key for key, where in table.items() if where == "W&B only"}


# ---------------------------------------------------------------------------- logging_interval
def test_logging_interval_step_logs_no_epoch_keys(tmp_path):
    logger = RecordingLogger()
    t = trainer(tmp_path, max_steps=10, logger=logger, log_every_n_steps=2, callbacks=[DSGDMonitor("step", plot=False)])
    t.fit(DSGDClassifier(dsgd=RANDOM))
    assert logger.steps_of("dsgd/stationarity") == [1, 3, 5, 7, 9] and logger.steps_of(next(iter(EPOCH_KEYS))) == []


@pytest.mark.parametrize("model", ["dsgd", "observe"])
def test_logging_interval_epoch_logs_the_epochs_last_step_with_the_counts(tmp_path, model):
    logger, record, monitor = RecordingLogger(), RecordChoices(), DSGDMonitor("epoch", plot=False)
    callbacks = [record, monitor] if model == "dsgd" else [monitor]
    t = trainer(tmp_path, max_steps=12, logger=logger, log_every_n_steps=1, callbacks=callbacks)
    t.fit(DSGDClassifier(dsgd=RANDOM) if model == "dsgd" else Classifier())
    dsgd_calls = [(m, step) for m, step in logger.calls if any(k.startswith("dsgd") for k in m)]
    assert [step for _, step in dsgd_calls] == [7, 11]  # each epoch's last step (the second stopped at 11)
    for epoch, (metrics, step) in enumerate(dsgd_calls):
        assert set(dsgd_part(metrics)) == STEP_KEYS | EPOCH_KEYS and metrics["epoch"] == epoch
        if model == "dsgd":
            assert dsgd_part(metrics) == {**expected_step_metrics(record.records[step]), **dsgd_part(metrics)}
    assert monitor.history.steps == [7, 11]
    assert t.callback_metrics["dsgd/stationarity"].item() == monitor.history.stationarity[-1]
    if model == "dsgd":
        assert monitor.epoch_counts == counts_per_epoch(record.layers, 8)  # every step is still counted
    else:
        assert [sum(c) for c in monitor.epoch_counts] == [1, 1]  # only the scored steps


def test_logging_interval_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"logging_interval='batch'\) is not an interval"):
        DSGDMonitor(logging_interval="batch")


def test_history_repr_is_one_short_line(tmp_path):
    monitor = DSGDMonitor(plot=False)
    trainer(tmp_path, max_steps=40, log_every_n_steps=1, callbacks=[monitor]).fit(DSGDClassifier())
    text = repr(monitor.history)
    assert text == "History(40 logged steps 0…39, 40 certified, 0 skipped, 0 with a realized decrease)"


def test_the_chart_never_calls_an_uncertified_estimate_guaranteed():
    history = History()
    for step, certified in enumerate([True, False, True]):
        history.append(step, 0, certified, 1.0, 0.1 * (step + 1), [1.0])
    series = dict(decrease_series(history))
    assert series == {
        "guaranteed decrease (certified)": [0.1, None, pytest.approx(0.3)],
        "estimated decrease (not certified)": [None, 0.2, None],
    }
    history.certified = [False, False, False]
    assert [label for label, _ in decrease_series(history)] == ["estimated decrease (not certified)"]


@pytest.mark.parametrize(
    ("settings", "label"),
    [(DSGDSettings(), "greedy pick (count)"), (DSGDSettings(constants="data"), "chosen layer (count)")],
)
def test_the_chart_names_the_greedy_pick_when_every_layer_moves(tmp_path, monkeypatch, settings, label):
    """With the defaults every layer moves: the top panel's layer is the greedy pick, not "the"
    chosen layer; with one layer per step (certified) it is the layer moved."""
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    trainer(tmp_path, max_steps=3, log_every_n_steps=1, callbacks=[DSGDMonitor(plot=True)]).fit(
        DSGDClassifier(dsgd=settings)
    )
    (figure,) = figures
    assert figure.axes[0].get_ylabel() == label


# ---------------------------------------------------------------------------- full batch
def full_batch_run(tmp_path, settings: DSGDSettings, epochs: int, **monitor_kwargs):
    logger, record = RecordingLogger(), RecordChoices()
    monitor = DSGDMonitor(full_batch=True, **monitor_kwargs)
    t = trainer(tmp_path, max_epochs=epochs, logger=logger, log_every_n_steps=1, callbacks=[record, monitor])
    t.fit(DSGDClassifier(batch_size=64, dsgd=settings))  # the 64 samples in one batch: full-batch descent
    return logger, record, monitor


def test_full_batch_realized_decrease_meets_the_guarantee(tmp_path):
    logger, record, monitor = full_batch_run(tmp_path, DSGDSettings(constants="data"), epochs=12, plot=False)
    losses = {step: m["train_loss"] for m, step in logger.calls_with("train_loss")}
    realized = logger.calls_with("dsgd/realized_decrease")
    assert [step for _, step in realized] == list(range(11))  # the last step's decrease is never known
    for metrics, step in realized:
        assert set(metrics) == {"dsgd/realized_decrease", "dsgd/bound_violations", "epoch"}
        assert metrics["epoch"] == step  # one step per epoch
        assert metrics["dsgd/realized_decrease"] == pytest.approx(losses[step] - losses[step + 1], abs=1e-6)
        assert metrics["dsgd/realized_decrease"] >= record.records[step].guaranteed_decrease.item() > 0
        assert metrics["dsgd/bound_violations"] == 0
    assert monitor.bound_violations == 0
    assert monitor.history.realized[:11] == [m["dsgd/realized_decrease"] for m, _ in realized]


def test_full_batch_catches_a_wrong_bound(tmp_path):
    # Loss bounds 10⁴ times too small: constants 10⁴ times too small, steps and "guarantees" far too big.
    wrong = LossBounds("wrong", g_l2=1.4e-4, h_l2=0.5e-4, g_linf=2e-4, h_linf=1e-4)
    logger, _, monitor = full_batch_run(tmp_path, DSGDSettings(loss=wrong, constants="data"), epochs=5, plot=False)
    assert monitor.bound_violations > 0
    assert logger.calls_with("dsgd/bound_violations")[-1][0]["dsgd/bound_violations"] == monitor.bound_violations


class ManualFullBatch(Classifier):
    """Plain manual optimization with DSGD(full_batch=True), handing the loss to ``step``."""

    def __init__(self) -> None:
        super().__init__(batch_size=64)
        self.automatic_optimization = False

    def configure_optimizers(self):
        return DSGD(self, full_batch=True)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        # The closure hands DSGD the loss at the current weights (Lightning always passes a closure
        # to step(), so step(loss=...) would be overwritten by its None).
        opt.step(closure=lambda: loss.detach())
        return loss


def test_the_realized_decrease_the_optimizer_records_is_used(tmp_path):
    logger, record = RecordingLogger(), RecordChoices()
    monitor = DSGDMonitor(plot=False)  # full_batch=False: the optimizer's record carries it
    trainer(tmp_path, max_epochs=5, logger=logger, log_every_n_steps=1, callbacks=[record, monitor]).fit(
        ManualFullBatch()
    )
    realized = logger.calls_with("dsgd/realized_decrease")
    assert [step for _, step in realized] == [0, 1, 2, 3]
    for (metrics, step), later in zip(realized, record.records[1:], strict=True):
        assert metrics["dsgd/realized_decrease"] == later.realized_decrease.item()
        assert metrics["dsgd/realized_decrease"] >= record.records[step].guaranteed_decrease.item()
    assert monitor.bound_violations == 0


# ---------------------------------------------------------------------------- observe-only mode
class SnapshotGradients(Callback):
    """Copies the network, its gradients and the batch where the monitor observes (every 2nd step)."""

    def __init__(self) -> None:
        self.batch = None
        self.snapshots: dict[int, tuple[nn.Module, list[torch.Tensor], Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step % 2 == 1:
            grads = [p.grad.clone() for p in pl_module.net.parameters()]
            self.snapshots[step] = (copy.deepcopy(pl_module.net), grads, self.batch)


def test_observe_mode_scores_adam_training_without_changing_it(tmp_path):
    plain = Classifier()
    trainer(tmp_path, max_steps=10).fit(plain)

    logger, snapshot, monitor = RecordingLogger(), SnapshotGradients(), DSGDMonitor(plot=False)
    observed = Classifier()
    trainer(tmp_path, max_steps=10, logger=logger, log_every_n_steps=2, callbacks=[snapshot, monitor]).fit(observed)
    for p, q in zip(plain.parameters(), observed.parameters(), strict=True):
        assert torch.equal(p, q)  # observing changed nothing

    calls = logger.calls_with("dsgd/stationarity")
    assert [step for _, step in calls] == [1, 3, 5, 7, 9] == sorted(snapshot.snapshots)
    for metrics, step in calls:
        assert set(dsgd_part(metrics)) == STEP_KEYS and metrics["dsgd/certified"] == 1
        # What DSGD itself decides on a copy of the network, its gradients and the batch at that step:
        net, grads, (x, _) = snapshot.snapshots[step]
        dsgd = DSGD(net, constants="data")
        net(x)  # the forward pass that records the input norms
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = g
        reference = dsgd.score()
        assert metrics["dsgd/layer"] == reference.layer
        assert metrics["dsgd/stationarity"] == reference.stationarity.item()
        for i, name in enumerate(NAMES):
            assert metrics[f"dsgd_layers/constant/{name}"] == reference.constants[i].item()
            assert metrics[f"dsgd_layers/score/{name}"] == reference.scores[i].item()
    # Counts are over the observed steps: 1, 3, 5, 7 in epoch 0; 9 in epoch 1 (stopped at step 9).
    assert [sum(c) for c in monitor.epoch_counts] == [4, 1]


class ReluClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_observe_mode_outside_the_rigorous_class_logs_uncertified(tmp_path):
    logger, monitor = RecordingLogger(), DSGDMonitor(plot=False)
    trainer(tmp_path, max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[monitor]).fit(ReluClassifier())
    calls = logger.calls_with("dsgd/certified")
    assert [step for _, step in calls] == [0, 1, 2]
    assert [m["dsgd/certified"] for m, _ in calls] == [0, 0, 0] and all("dsgd/layer" in m for m, _ in calls)
    assert monitor.history.certified == [False, False, False]


def test_observe_mode_warns_once_and_stays_quiet_when_dsgd_cannot_score(tmp_path, monkeypatch):
    class Refusing(DSGD):
        def __init__(self, *args, **kwargs):
            raise ValueError("no layer DSGD can score")

    monkeypatch.setattr("lightning_dsgd.lightning.callback.DSGD", Refusing)
    logger = RecordingLogger()
    with pytest.warns(UserWarning, match="observe-only mode is off") as warned:
        trainer(tmp_path, max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[DSGDMonitor()]).fit(Classifier())
    assert sum("observe-only" in str(w.message) for w in warned) == 1
    assert logger.steps_of("train_loss") == [0, 1, 2]
    assert not any(key.startswith("dsgd") for metrics, _ in logger.calls for key in metrics)


def test_observe_false_logs_nothing_for_another_optimizer(tmp_path):
    logger = RecordingLogger()
    with pytest.warns(UserWarning, match="nothing to log"):
        trainer(tmp_path, max_steps=2, logger=logger, callbacks=[DSGDMonitor(observe=False)]).fit(Classifier())
    assert not any(key.startswith("dsgd") for metrics, _ in logger.calls for key in metrics)


# ---------------------------------------------------------------------------- resume
def test_resume_continues_counts_history_and_the_pending_decrease(tmp_path):
    def run(ckpt_path=None, callbacks=()) -> DSGDMonitor:
        monitor = DSGDMonitor(full_batch=True, plot=False)
        t = trainer(
            tmp_path,
            max_epochs=6,
            log_every_n_steps=1,
            callbacks=[monitor, *callbacks],
            enable_checkpointing=bool(callbacks),
        )
        t.fit(DSGDClassifier(batch_size=64, dsgd=RANDOM), ckpt_path=ckpt_path)
        return monitor

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    uninterrupted = run(callbacks=[ckpt])
    resumed = run(ckpt_path=sorted((tmp_path / "ckpt").glob("epoch=2-*.ckpt"))[0])
    assert resumed.epoch_counts == uninterrupted.epoch_counts and len(resumed.epoch_counts) == 6
    assert resumed.history.steps == uninterrupted.history.steps == list(range(6))
    assert resumed.history.layers == uninterrupted.history.layers
    # Step 2's realized decrease needs the loss after the checkpoint: it was carried over.
    assert resumed.history.realized[:5] == pytest.approx(uninterrupted.history.realized[:5], rel=1e-6)
    assert None not in resumed.history.realized[:5]
    assert resumed.bound_violations == uninterrupted.bound_violations == 0


# ---------------------------------------------------------------------------- the metric
def test_layer_selection_frequency_counts():
    metric = LayerSelectionFrequency(3)
    for layer in (2, 0, 2):
        metric.update(layer)
    metric.update(torch.tensor([1, 2]))
    metric.update(torch.empty(0, dtype=torch.long))
    assert metric.compute().tolist() == [1, 1, 3]
    metric.reset()
    metric.update(torch.empty(0, dtype=torch.long))
    assert metric.compute().tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="out of range"):
        metric.update(3)
    with pytest.raises(ValueError, match="out of range"):
        metric.update(torch.tensor([-1]))


# ---------------------------------------------------------------------------- the picture
def test_the_picture(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    _, record, monitor = full_batch_run(tmp_path, DSGDSettings(), epochs=60, dirpath=str(tmp_path / "png"))
    assert monitor.png_path == tmp_path / "png" / "dsgd_layers.png"
    assert monitor.png_path.stat().st_size > 20_000
    pixels = image.imread(monitor.png_path)
    assert pixels.shape[:2] == (900, 900)
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert len(set(record.layers)) > 1  # the picture shows more than one layer being chosen


# ---------------------------------------------------------------------------- a real offline W&B run
def test_wandb_offline_history_has_the_layer_and_bounds(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from helpers.wandb_reader import history, records, run_file, wait_until_closed
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")  # restored afterwards, with what WandbLogger(offline) sets
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = wandb.Settings(x_disable_stats=True, console="off", silent=True)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="dsgd-test", settings=settings)
    record = RecordChoices()
    t = trainer(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=2, callbacks=[record, DSGDMonitor()])
    try:
        t.fit(DSGDClassifier(dsgd=RANDOM))
    finally:
        wandb.finish()

    path = run_file(tmp_path)
    wait_until_closed(path)
    rows = [row for row in history(path) if "dsgd/stationarity" in row]
    assert [row["trainer/global_step"] for row in rows] == [1, 3, 5, 7, 9, 11, 13, 15]
    # The name (a string) comes in a W&B-only call at the same trainer/global_step.
    names = {row["trainer/global_step"]: row["dsgd/layer_name"] for row in history(path) if "dsgd/layer_name" in row}
    for row in rows:
        rec = record.records[row["trainer/global_step"]]
        assert row["dsgd/layer"] == rec.layer and names[row["trainer/global_step"]] == rec.layer_name
        assert row["epoch"] == row["trainer/global_step"] // 8 and "train_loss" in row
        assert row["dsgd/stationarity"] == rec.stationarity.item()
        assert row["dsgd/guaranteed_decrease"] == rec.guaranteed_decrease.item()
        for i, name in enumerate(NAMES):
            assert row[f"dsgd_layers/constant/{name}"] == rec.constants[i].item()
            assert row[f"dsgd_layers/dual_norm/{name}"] == rec.dual_norms[i].item()

    expected = counts_per_epoch(record.layers, 8)
    epoch_rows = [row for row in history(path) if "dsgd_epoch/frequency/net.0" in row]
    assert [row["trainer/global_step"] for row in epoch_rows] == [7, 15]
    assert [[row[f"dsgd_epoch/frequency/{n}"] for n in NAMES] for row in epoch_rows] == expected
    media = [row for row in history(path) if "dsgd_epoch/selection/_type" in row]
    assert [row["dsgd_epoch/selection_histogram/values"] for row in media] == expected
    tables = sorted(path.parent.glob("files/media/table/dsgd_epoch/selection_*.table.json"))
    assert len(tables) == 2  # one media file per epoch
    contents = [json.loads(p.read_text()) for p in tables]
    assert sorted([row[3] for row in c["data"]] for c in contents) == sorted(expected)

    defined = {m.glob_name or m.name: m.step_metric for m in records(path, "metric")}
    assert defined["dsgd/*"] == defined["dsgd_layers/*"] == "trainer/global_step"


# ---------------------------------------------------------------------------- 2-process DDP
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("mode", ["dsgd", "observe", "full_batch"])
def test_ddp_counts_are_the_true_counts_on_every_rank(tmp_path, mode):
    script = Path(__file__).with_name("monitor_run.py")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, str(script), "--mode", mode, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["layers"] == rank1["layers"]  # every rank decided (or observed) the same
    steps_per_epoch = 8 if mode != "full_batch" else 1
    true_counts = [[0] * len(NAMES) for _ in range(len(rank0["epoch_counts"]))]
    for step, layer in zip(rank0["steps"], rank0["layers"], strict=True):
        true_counts[step // steps_per_epoch][layer] += 1
    assert rank0["epoch_counts"] == rank1["epoch_counts"] == true_counts  # summed over ranks, counted once
    assert sum(map(sum, true_counts)) == (16 if mode == "dsgd" else 8 if mode == "observe" else 6)
    if mode == "dsgd":
        assert len({layer for layer in rank0["layers"]}) > 1
    if mode == "full_batch":  # the realized decrease of the global (rank-averaged) loss
        assert rank0["realized"] == rank1["realized"] and None not in rank0["realized"][:-1]
        for realized, guaranteed in zip(rank0["realized"][:-1], rank0["guaranteed"][:-1], strict=True):
            assert realized >= guaranteed > 0
        assert rank0["violations"] == rank1["violations"] == 0
