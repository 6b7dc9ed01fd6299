"""DSGDMixin inside a real Trainer on CPU: one backward and one step per batch, the loop settings
(accumulation, clipping, η schedules), precision, checkpoints, and clear errors."""

from __future__ import annotations

import glob

import pytest
import torch
from helpers.lightning_models import Classifier, DSGDClassifier, RecordChoices
from helpers.lightning_models import quiet_trainer as trainer
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_dsgd import DSGD, DSGDMixin, DSGDSettings


def reference_run(
    settings: DSGDSettings, steps: int, *, seed: int = 0, window: int = 1, hidden: int = 8
) -> tuple[nn.Module, list]:
    """The same training in plain PyTorch: the batches of Classifier's loader, in order."""
    module = Classifier(seed=seed, hidden=hidden)
    opt = DSGD(module, **settings.optimizer_kwargs())
    batches = list(module.train_dataloader())
    layers, t = [], 0
    while len(layers) < steps:
        x, y = batches[t % len(batches)]
        (nn.functional.cross_entropy(module(x), y) / window).backward()
        t += 1
        position = (t - 1) % len(batches) + 1  # windows restart with every epoch
        if position % window == 0 or position == len(batches):
            opt.step()
            opt.zero_grad()
            layers.append(opt.last_step.layer)
    return module, layers


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_an_ordinary_module_trains_unchanged_with_the_mixin(tmp_path):
    plain = Classifier()
    trainer(tmp_path, max_steps=6).fit(plain)  # still works without the mixin: Adam, automatic mode
    assert plain.automatic_optimization and isinstance(plain.trainer.optimizers[0], torch.optim.Adam)

    model = DSGDClassifier()
    record = RecordChoices()
    t = trainer(tmp_path, max_steps=20, callbacks=[record])
    t.fit(model)
    assert not model.automatic_optimization
    assert t.global_step == 20 and model.dsgd_optimizer.steps_taken == 20
    expected, layers = reference_run(DSGDSettings(constants="data"), 20)
    assert record.layers == layers
    assert_same_weights(model, expected)


def test_steps_drive_max_steps_checkpoints_and_validation(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    t = trainer(
        tmp_path, max_steps=12, callbacks=[ckpt], enable_checkpointing=True, limit_val_batches=1, val_check_interval=4
    )
    model = DSGDClassifier()
    t.fit(model)
    assert t.global_step == 12
    names = sorted(p.split("step=")[1] for p in glob.glob(str(tmp_path / "ckpt" / "*.ckpt")))
    assert names == ["10.ckpt", "5.ckpt"]
    assert "val_loss" in t.callback_metrics


def test_gradient_accumulation_selects_on_the_accumulated_gradient(tmp_path):
    settings = DSGDSettings(accumulate_grad_batches=3)
    record = RecordChoices()
    t = trainer(tmp_path, max_epochs=2, callbacks=[record])
    model = DSGDClassifier(dsgd=settings)
    t.fit(model)
    # 8 batches per epoch → windows of 3, 3 and the epoch's last 2: 3 steps per epoch.
    assert t.global_step == 6 and len(record.layers) == 6
    expected, layers = reference_run(settings, 6, window=3)
    assert record.layers == layers
    assert_same_weights(model, expected)


def test_gradient_clipping_is_applied_before_scoring(tmp_path):
    record = RecordChoices()
    model = DSGDClassifier(dsgd=DSGDSettings(norm="frobenius", gradient_clip_val=1e-3))
    trainer(tmp_path, max_steps=3, callbacks=[record]).fit(model)
    for rec in record.records:  # Frobenius dual norms: the total is the clipped gradient norm
        assert rec.dual_norms.square().sum().sqrt().item() == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_eta_schedules(tmp_path, interval):
    settings = DSGDSettings(
        eta=1.0,
        eta_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        eta_scheduler_interval=interval,
        eta_scheduler_frequency=2,
    )
    record = RecordChoices()
    trainer(tmp_path, max_steps=16, callbacks=[record]).fit(DSGDClassifier(dsgd=settings))
    if interval == "step":  # halved after every 2nd step
        assert record.etas[:6] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    else:  # 8 steps per epoch, halved after every 2nd epoch: still 1.0 in epochs 0–1
        assert record.etas == [1.0] * 16


def test_learning_rate_monitor_logs_eta_per_layer_name(tmp_path):
    """The param groups are keyed ``"name"``, the key Lightning's LearningRateMonitor reads."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    monitor = LearningRateMonitor(logging_interval="step")
    model = DSGDClassifier()
    trainer(tmp_path, max_steps=2, callbacks=[monitor], logger=CSVLogger(tmp_path)).fit(model)
    assert sorted(monitor.lrs) == sorted(f"lr-DSGD/{name}" for name in model.dsgd_optimizer.layer_names)


def test_eta_schedule_per_epoch_changes_after_the_window(tmp_path):
    settings = DSGDSettings(
        eta_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        eta_scheduler_interval="epoch",
    )
    record = RecordChoices()
    trainer(tmp_path, max_epochs=3, callbacks=[record]).fit(DSGDClassifier(dsgd=settings))
    assert record.etas == [1.0] * 8 + [0.5] * 8 + [0.25] * 8


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"accumulate_grad_batches": 2}, r"DSGDSettings\(accumulate_grad_batches=2\)"),
        ({"gradient_clip_val": 0.5}, r"DSGDSettings\(gradient_clip_val=0.5"),
    ],
)
def test_trainer_flags_that_cannot_work_name_the_replacement(tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, max_steps=1, **flags).fit(DSGDClassifier())


def test_a_user_manual_optimization_module_is_refused(tmp_path):
    class Manual(DSGDClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="sets automatic_optimization = False"):
        trainer(tmp_path, max_steps=1).fit(Manual())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="accumulate_grad_batches must be"):
        DSGDSettings(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match="eta must be a number in"):
        DSGD(Classifier(), **DSGDSettings(eta=2.5).optimizer_kwargs())


# ---------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_precisions(tmp_path, precision):
    record = RecordChoices()
    model = DSGDClassifier()
    trainer(tmp_path, max_steps=8, precision=precision, callbacks=[record]).fit(model)
    assert len(record.layers) == 8 and not any(r.skipped for r in record.records)
    assert all(r.scores.dtype == torch.float32 and r.dual_norms.dtype == torch.float32 for r in record.records)
    _, reference = reference_run(DSGDSettings(constants="data"), 8)
    if precision == "32-true":
        assert record.layers == reference


def fp16_trainer(tmp_path, **kwargs) -> Trainer:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    return trainer(tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], **kwargs)


def test_float16_mixed_sees_unscaled_gradients(tmp_path):
    record = RecordChoices()
    model = DSGDClassifier(dsgd=DSGDSettings(norm="frobenius"))
    fp16_trainer(tmp_path, max_steps=4, callbacks=[record]).fit(model)
    reference = RecordChoices()
    trainer(tmp_path, max_steps=4, callbacks=[reference]).fit(DSGDClassifier(dsgd=DSGDSettings(norm="frobenius")))
    first, ref = record.records[0], reference.records[0]
    assert not first.skipped
    # Scaled gradients would be 65536× larger; float16 rounding leaves a few per mille.
    torch.testing.assert_close(first.dual_norms, ref.dual_norms, rtol=2e-2, atol=1e-4)


class OverflowingClassifier(Classifier):
    """Produces an infinite loss on its third batch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == 2 else loss


class Overflow(DSGDMixin, OverflowingClassifier):
    dsgd = DSGDSettings(constants="data")


def test_a_step_the_scaler_skips_is_recorded_as_skipped(tmp_path):
    record = RecordChoices()
    model = Overflow()
    before = {}

    class Snapshot(RecordChoices):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    snap = Snapshot()
    fp16_trainer(tmp_path, max_steps=4, callbacks=[record, snap]).fit(model)
    assert [r.skipped for r in record.records] == [False, False, True, False]
    assert "GradScaler" in record.records[2].skip_reason and record.records[2].layer is None
    assert model.dsgd_optimizer.skipped_steps == 1


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("selection", ["greedy", "random"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, selection):
    settings = DSGDSettings(selection=selection, seed=7)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    full = RecordChoices()
    uninterrupted = DSGDClassifier(dsgd=settings)
    trainer(tmp_path, max_epochs=4, callbacks=[full, ckpt], enable_checkpointing=True).fit(uninterrupted)

    path = glob.glob(str(tmp_path / "ckpt" / "epoch=1-*.ckpt"))[0]
    resumed_record = RecordChoices()
    resumed = DSGDClassifier(dsgd=settings, seed=123)  # different initial weights: all must come from the ckpt
    t = trainer(tmp_path, max_epochs=4, callbacks=[resumed_record])
    t.fit(resumed, ckpt_path=path)
    assert t.global_step == 32
    assert resumed.dsgd_optimizer.steps_taken == 32
    assert resumed_record.layers == full.layers[16:]
    for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_full_batch_training_records_realized_decreases(tmp_path):
    """The mixin hands the loss to DSGD, so full_batch can compare each step with its promise."""
    record = RecordChoices()
    model = DSGDClassifier(batch_size=64, dsgd=DSGDSettings(full_batch=True))  # one batch = the data set
    trainer(tmp_path, max_steps=8, callbacks=[record]).fit(model)
    for previous, current in zip(record.records, record.records[1:], strict=False):
        assert current.loss is not None and current.realized_decrease is not None
        torch.testing.assert_close(current.realized_decrease, previous.loss - current.loss)
        assert current.realized_decrease >= previous.guaranteed_decrease * (1 - 1e-4)
