"""The ``lightning-dsgd`` command: models and data by class path, DSGD settings from one place,
strategies and callbacks by class path or short name, fit/validate/test and --print_config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning_dsgd  # noqa: E402
from lightning_dsgd import DSGD, DSGDMixin, DSGDMonitor, DSGDSingleDeviceStrategy  # noqa: E402
from lightning_dsgd.cli import cli, main  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the package of this checkout, in a subprocess run elsewhere
DIGITS = ["--model=examples.models.TanhMLP", "--data=examples.digits.DigitsDataModule"]
QUIET = [
    "--trainer.max_steps=2",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=0",
    "--seed_everything=0",
]


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", ["lightning-dsgd"])
    return tmp_path


def test_an_ordinary_module_is_trained_by_dsgd():
    result = cli(["fit", *DIGITS, *QUIET])
    assert isinstance(result.model, DSGDMixin) and type(result.model).__name__ == "TanhMLP"
    assert isinstance(result.trainer.optimizers[0], DSGD) and result.trainer.global_step == 2
    assert result.model.dsgd_optimizer.geometry.name == "spectral"  # the defaults


def test_dsgd_key_sets_the_settings():
    result = cli(["fit", *DIGITS, *QUIET, "--dsgd.norm=linf", "--dsgd.selection=cyclic", "--dsgd.eta=0.5"])
    optimizer = result.model.dsgd_optimizer
    assert optimizer.geometry.name == "linf" and optimizer.selection == "cyclic"
    assert optimizer.selection_counts == [1, 1, 0] and optimizer.last_step.eta == 0.5


def test_eta_schedule_from_the_command_line():
    schedule = ["--dsgd.eta_scheduler=torch.optim.lr_scheduler.StepLR", "--dsgd.eta_scheduler.step_size=1"]
    result = cli(["fit", *DIGITS, *QUIET, *schedule, "--dsgd.eta_scheduler.gamma=0.5"])
    assert result.model.dsgd_optimizer.param_groups[0]["lr"] == 0.25  # halved after each of the 2 steps


def test_a_mixin_module_keeps_its_own_settings():
    model = ["--model=helpers.lightning_models.DSGDClassifier", "--model.dsgd.norm=frobenius"]
    result = cli(["fit", *model, *QUIET])
    assert result.model.dsgd_optimizer.geometry.name == "frobenius"


def test_strategy_and_callback_by_class_path_and_short_name():
    strategy = ["--trainer.strategy=lightning_dsgd.DSGDSingleDeviceStrategy", "--trainer.strategy.dsgd.norm=linf"]
    result = cli(["fit", *DIGITS, *QUIET, *strategy, "--trainer.callbacks+=DSGDMonitor"])
    assert isinstance(result.trainer.strategy, DSGDSingleDeviceStrategy)
    assert result.model.dsgd_optimizer.geometry.name == "linf"
    monitor = next(c for c in result.trainer.callbacks if isinstance(c, DSGDMonitor))
    assert monitor.layer_names == ["net.fc1", "net.fc2", "net.fc3"]  # it found DSGD and read its records


def test_registered_strategy_name():
    result = cli(["fit", *DIGITS, *QUIET, "--trainer.strategy=dsgd"])
    assert isinstance(result.trainer.strategy, DSGDSingleDeviceStrategy)


def test_settings_in_two_places_are_refused():
    strategy = ["--trainer.strategy=lightning_dsgd.DSGDSingleDeviceStrategy", "--trainer.strategy.dsgd.norm=linf"]
    with pytest.raises(ValueError, match=r"DSGD settings are given in 2 places \(dsgd, trainer.strategy"):
        cli(["fit", *DIGITS, *QUIET, *strategy, "--dsgd.norm=frobenius"])


def test_there_is_no_optimizer_option(capsys):
    with pytest.raises(SystemExit):
        cli(["fit", *DIGITS, *QUIET, "--optimizer=torch.optim.SGD"])
    assert "optimizer" in capsys.readouterr().err


def test_print_config_writes_every_class_path(capsys):
    config = ROOT / "examples" / "configs" / "digits.yaml"
    with pytest.raises(SystemExit) as exit_:
        cli(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    for text in ("class_path: examples.models.TanhMLP", "class_path: lightning_dsgd.DSGDMonitor", "norm: spectral"):
        assert text in printed


def test_fit_then_validate_and_test_from_the_checkpoint(workdir):
    fit = cli(["fit", *DIGITS, *QUIET[:1], "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    (checkpoint,) = workdir.glob("**/*.ckpt")
    assert fit.trainer.global_step == 2
    for subcommand, key in (("validate", "val/acc"), ("test", "test/acc")):
        result = cli([subcommand, *DIGITS, "--trainer.logger=false", f"--ckpt_path={checkpoint}"])
        assert 0.0 <= float(result.trainer.callback_metrics[key]) <= 1.0


def test_console_script_is_registered_and_runs():
    assert 'lightning-dsgd = "lightning_dsgd.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert main.__annotations__["return"] == "None"  # console scripts exit with main()'s return value
    result = subprocess.run(
        [sys.executable, "-m", "lightning_dsgd.cli", "--help"], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(command in result.stdout for command in ("fit", "validate", "test"))


def test_help_introduces_dsgd_and_version_names_the_package():
    help_ = subprocess.run(
        [sys.executable, "-m", "lightning_dsgd.cli", "--help"], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert help_.returncode == 0, help_.stderr[-2000:]
    assert help_.stdout.startswith("usage: lightning-dsgd ")
    text = " ".join(help_.stdout.split())
    assert "duality structure gradient descent" in text and "Lightning Trainer command line tool" not in text
    version = subprocess.run(
        [sys.executable, "-m", "lightning_dsgd.cli", "--version"], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.startswith(f"lightning-dsgd {lightning_dsgd.__version__} (lightning ")


def test_rows_norm_from_the_command_line():
    result = cli(["fit", *DIGITS, *QUIET, "--dsgd.norm=rows"])
    assert result.model.dsgd_optimizer.geometry.name == "rows"
