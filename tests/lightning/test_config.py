"""DSGD settings and strategies from a LightningCLI YAML and by registered name."""

from __future__ import annotations

import pytest
from helpers.lightning_models import Classifier, RecordChoices
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from lightning_dsgd import DSGD, DSGDMixin, DSGDSettings, DSGDSingleDeviceStrategy

YAML = """
model:
  class_path: helpers.lightning_models.DSGDClassifier
  init_args:
    hidden: 5
    dsgd:
      norm: linf
      eta: 0.5
      accumulate_grad_batches: 2
      eta_scheduler:
        class_path: torch.optim.lr_scheduler.StepLR
        init_args: {step_size: 1, gamma: 0.5}
trainer:
  strategy:
    class_path: lightning_dsgd.DSGDSingleDeviceStrategy
    init_args: {verify_every_n_steps: 1}
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def test_settings_and_strategy_from_a_lightning_cli_yaml(tmp_path):
    config = tmp_path / "dsgd.yaml"
    config.write_text(YAML)
    cli = LightningCLI(
        run=False, save_config_callback=None, args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    )
    model = cli.model
    assert model.dsgd.norm == "linf" and model.dsgd.eta == 0.5 and model.dsgd.accumulate_grad_batches == 2
    assert model.hparams.hidden == 5 and "dsgd" not in model.hparams
    assert isinstance(cli.trainer.strategy, DSGDSingleDeviceStrategy)
    cli.trainer.fit(model)
    assert cli.trainer.global_step == 3
    opt = model.dsgd_optimizer
    assert opt.geometry.name == "linf" and opt.last_step.eta == 0.125  # 0.5 halved after steps 1 and 2


def test_registered_name_turns_an_ordinary_module_into_dsgd(tmp_path):
    import lightning_dsgd  # noqa: F401  (registration happens at import)

    module = Classifier()
    record = RecordChoices()
    trainer = Trainer(
        strategy="dsgd",
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[record],
    )
    trainer.fit(module)
    assert isinstance(module, DSGDMixin) and isinstance(trainer.optimizers[0], DSGD)
    assert trainer.global_step == 4 and len(record.layers) == 4
    assert type(module).__name__ == "Classifier"


def test_strategy_settings_apply_to_a_module_without_the_mixin(tmp_path):
    module = Classifier()
    strategy = DSGDSingleDeviceStrategy(dsgd=DSGDSettings(norm="frobenius", selection="cyclic"))
    Trainer(
        strategy=strategy,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(module)
    assert [r for r in module.dsgd_optimizer.selection_counts] == [1, 1, 1]
    assert module.dsgd_optimizer.geometry.name == "frobenius"


def test_negative_verification_interval_is_refused():
    with pytest.raises(ValueError, match="verify_every_n_steps must be"):
        DSGDSingleDeviceStrategy(verify_every_n_steps=-1)


def test_settings_are_the_optimizers_arguments_with_its_defaults_and_types():
    """Options defined once: every DSGD keyword argument (but the model's own chain and the
    distributed hooks the mixin supplies) is a setting, with the same default and annotation."""
    import dataclasses
    import inspect

    parameters = inspect.signature(DSGD.__init__).parameters
    fields = {field.name: field for field in dataclasses.fields(DSGDSettings)}
    supplied = {"self", "model", "chain", "reduce_max", "gather"}
    assert set(parameters) - supplied <= set(fields)
    assert list(DSGDSettings().optimizer_kwargs()) == [name for name in parameters if name not in supplied]
    for name in DSGDSettings().optimizer_kwargs():
        assert fields[name].default == parameters[name].default, name
    for name in ("constants", "selection", "nonfinite"):  # the same Literal, not a copy of its values
        assert fields[name].type == parameters[name].annotation, name
