"""Issue 11, through Lightning: every way a user writes a DSGD module trains with DSGD or fails at
the start of fit with the fix; a wrong loss is not certified; η on resume and η schedules reaching 0
are loud; the module pickles after fit; settings are checked at construction; the fit-start line
and the loggers' config say what runs."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from helpers.lightning_models import Classifier, DSGDClassifier, RecordChoices, quiet_trainer
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from lightning_dsgd import DSGD, DSGDMixin, DSGDSettings, DSGDSingleDeviceStrategy, with_dsgd


def trainer(tmp_path, **kwargs) -> Trainer:
    # max_epochs: a run that never steps ends (and fails its assertions) instead of hanging
    return quiet_trainer(tmp_path, **{"max_epochs": 4, **kwargs})


def weights(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_trained_with_dsgd(model: LightningModule, t: Trainer, steps: int, before: list[Tensor]) -> None:
    assert isinstance(t.optimizers[0], DSGD), type(t.optimizers[0]).__name__
    assert t.global_step == steps and model.dsgd_optimizer.steps_taken == steps
    assert model.dsgd_optimizer.skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------------- items 1-3: the wiring
class DirectNet(DSGDMixin, LightningModule):
    """The natural way to write a new model: the mixin and the module's own training_step."""

    dsgd = DSGDSettings(constants="data")  # the paper's certified algorithm (the default is adaptive)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self):
        return Classifier().train_dataloader()


class OverridingStep(DSGDClassifier):
    """A subclass of a mixed-in class overriding training_step (and calling super's)."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return {"loss": out}


class OverridingWithoutSuper(DSGDClassifier):
    """A subclass of a mixed-in class writing its own training_step from scratch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class MixinSecond(Classifier, DSGDMixin):
    """The mixin second among the bases: the module's own Adam and hooks come first."""

    dsgd = DSGDSettings(constants="data")  # as DSGDClassifier


class OwnAdam(DSGDMixin, LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())

    def train_dataloader(self):
        return Classifier().train_dataloader()


class OwnDSGD(OwnAdam):
    def configure_optimizers(self):
        return DSGD(self, norm="frobenius", chain=[self.net[0]])


@pytest.mark.parametrize("cls", [DirectNet, OverridingStep, OverridingWithoutSuper, MixinSecond])
def test_every_way_of_writing_the_module_trains_with_dsgd(tmp_path, cls):
    model = cls()
    before = weights(model)
    t = trainer(tmp_path, max_steps=5, max_epochs=3)
    t.fit(model)
    assert_trained_with_dsgd(model, t, 5, before)
    assert not model.automatic_optimization


def test_mixin_second_gives_the_same_run_as_mixin_first(tmp_path):
    first, second = DSGDClassifier(), MixinSecond()
    for model in (first, second):
        trainer(tmp_path, max_steps=6).fit(model)
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


def test_configure_optimizers_in_the_dsgd_class_must_build_dsgd(tmp_path):
    with pytest.raises(TypeError, match="OwnAdam.configure_optimizers returned Adam, but DSGDMixin trains with DSGD"):
        trainer(tmp_path, max_steps=2).fit(OwnAdam())
    model = OwnDSGD()  # returning DSGD is how a chain or other constructor arguments are declared
    t = trainer(tmp_path, max_steps=3)
    t.fit(model)
    assert model.dsgd_optimizer.geometry.name == "frobenius" and model.dsgd_optimizer.steps_taken == 3


def test_a_training_step_that_never_returns_a_loss_fails_at_the_epoch_end(tmp_path):
    class NoLoss(DirectNet):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            return None

    with pytest.raises(RuntimeError, match="training_step returned no loss for any of them, so DSGD never stepped"):
        trainer(tmp_path, max_epochs=2, max_steps=50).fit(NoLoss())


# ---------------------------------------------------------------------- item 5: the certificate
class MSENet(DirectNet):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), nn.functional.one_hot(y, 3).float())


class PenalisedNet(DirectNet):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-3 * self.net[0].weight.square().sum()


@pytest.mark.parametrize(
    ("cls", "reason"),
    [(MSENet, "MseLossBackward0"), (PenalisedNet, "AddBackward0")],
)
def test_a_loss_other_than_the_certified_one_is_not_certified(tmp_path, cls, reason):
    record = RecordChoices()
    t = trainer(tmp_path, max_steps=3, callbacks=[record])
    t.fit(cls())
    assert [r.certified for r in record.records] == [False] * 3
    assert all(reason in r.not_certified_reason for r in record.records)
    honest = RecordChoices()
    trainer(tmp_path, max_steps=3, callbacks=[honest]).fit(DirectNet())
    assert [r.certified for r in honest.records] == [True] * 3


# ---------------------------------------------------------------------- item 7: η
def test_eta_changed_in_the_settings_wins_on_resume_and_says_so(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path, max_steps=3, callbacks=[ckpt], enable_checkpointing=True).fit(DSGDClassifier())
    resumed = DSGDClassifier(dsgd=DSGDSettings(constants="data", eta=0.5))
    record = RecordChoices()
    t = trainer(tmp_path, max_steps=5, callbacks=[record])
    with pytest.warns(UserWarning, match=r"trained with η=1; DSGDSettings\(eta=0.5\) wins from now on"):
        t.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert record.etas == [0.5, 0.5]


def test_an_eta_schedule_reaching_zero_fails_loudly(tmp_path):
    settings = DSGDSettings(eta_scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=3))
    with pytest.raises(ValueError, match="η reached 0 at step 3"):
        trainer(tmp_path, max_steps=10).fit(DSGDClassifier(dsgd=settings))


# ---------------------------------------------------------------------- item 9: hooks removed
@pytest.mark.parametrize("way", ["mixin", "strategy", "with_dsgd"])
def test_the_module_pickles_after_fit(tmp_path, way):
    model = DSGDClassifier() if way == "mixin" else Classifier()
    strategy = DSGDSingleDeviceStrategy() if way == "strategy" else "auto"
    if way == "with_dsgd":
        model = with_dsgd(model, {"norm": "frobenius"})
    trainer(tmp_path, max_steps=2, strategy=strategy).fit(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    copy = pickle.loads(pickle.dumps(model))
    torch.save(model, tmp_path / "model.pt")
    assert isinstance(copy, DSGDMixin) == (way != "strategy" or isinstance(model, DSGDMixin))
    for p, q in zip(model.parameters(), copy.parameters(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------- item 10: settings
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "spectal"}, "Unknown norm 'spectal'"),
        ({"eta": 3}, r"eta must be a number in \(0, 2\)"),
        ({"eta": True}, "eta must be a real number"),
        ({"constants": "archi"}, "Unknown constants='archi'"),
        ({"layers_per_step": "two"}, "layers_per_step must be an int ≥ 1, 'all', or None"),
        ({"seed": "a"}, "seed must be an int"),
        ({"adaptive_options": {"floor": -1}}, r"adaptive_options\['floor'\] must be a number"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches must be an int ≥ 1"),
    ],
)
def test_settings_are_checked_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DSGDSettings(**kwargs)


def test_settings_accept_rows_numpy_and_tensor_numbers_and_dicts(tmp_path):
    import numpy as np

    assert DSGDSettings(norm="rows").norm == "rows"
    assert DSGDSettings(eta=np.float32(0.5)).eta == 0.5 and DSGDSettings(eta=torch.tensor(0.5)).eta == 0.5
    model = DSGDClassifier(dsgd={"norm": "linf"})
    assert model.dsgd == DSGDSettings(norm="linf")
    with pytest.raises(ValueError, match=r"Unknown DSGD setting\(s\) \['nrom'\]"):
        DSGDClassifier(dsgd={"nrom": "linf"})
    t = trainer(tmp_path, max_steps=2)
    t.fit(model)
    assert model.dsgd_optimizer.geometry.name == "linf"


def test_a_model_dsgd_cannot_train_fails_before_any_logger_run(tmp_path):
    class Relu(DirectNet):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    logger = CSVLogger(tmp_path / "logs")
    t = trainer(tmp_path, max_steps=2, logger=logger)
    with pytest.raises(ValueError, match="constants='architecture' exists only for the rigorous class"):
        t.fit(with_dsgd(Relu(), {"constants": "architecture"}))
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------- the fit-start line and config
def test_fit_start_line_and_logger_config(tmp_path, caplog):
    logger = CSVLogger(tmp_path / "logs")
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, max_steps=2, logger=logger).fit(with_dsgd(Classifier(), {"constants": "adaptive"}))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DSGD:")]
    assert lines == [
        "DSGD: 3 layers ['net.0', 'net.2', 'net.4'], norm='spectral', constants='adaptive', selection='greedy'; "
        "not certified: constants='adaptive' are estimates corrected by the curvature met."
    ]
    hparams = (tmp_path / "logs" / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "constants: adaptive" in hparams and "- net.4" in hparams and "certified: false" in hparams


def test_validation_alone_does_not_build_dsgd_or_check_training_flags(tmp_path):
    model = DSGDClassifier()
    t = trainer(tmp_path, limit_val_batches=2, gradient_clip_val=1.0)
    t.validate(model)
    with pytest.raises(ValueError, match=r"Trainer\(gradient_clip_val=1.0\) does not work with DSGD"):
        t.fit(model)
