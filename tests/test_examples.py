"""Every example runs end to end on offline data, on a tiny budget: the scripts, every YAML config
in examples/configs through the ``lightning-dsgd`` command, the data readers on fake MNIST/CIFAR-10
files, and the multi-device configs as real 2-process runs (slow)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml

from examples import datasets  # `examples`: a folder of the repository (pytest's pythonpath has the root)
from examples.datasets import DataNotFoundError, write_fake_cifar10, write_fake_mnist
from lightning_dsgd import DSGD, DSGDMixin
from lightning_dsgd.cli import cli

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "examples" / "configs"
TINY = [
    "--trainer.max_steps=3",
    "--trainer.max_epochs=3",
    "--trainer.log_every_n_steps=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder (relative log folders land there), with W&B offline and quiet."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the cwd on sys.path
    monkeypatch.setattr(sys, "argv", ["lightning-dsgd"])  # not pytest's arguments
    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) changes it; restored after
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    if sys.modules.get("wandb") is not None:
        sys.modules["wandb"].finish()


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def logged(path: Path, key: str) -> list[str]:
    return [row[key] for row in rows(path) if row.get(key)]


# ---------------------------------------------------------------------- the README's main job
def test_digits_script_logs_to_csv_and_wandb_and_saves_the_chart(workdir, capsys):
    """`make demo`: the defaults (every layer moves, not certified), then the paper's certified
    algorithm from the same weights; both printed, logged and charted."""
    from examples import digits

    result = digits.main(["--epochs", "1", "--max-steps", "4", "--out", str(workdir / "logs")])
    assert result["constants"] == "adaptive" and result["steps"] == 4 and result["skipped_steps"] == 0
    assert not result["certified"] and result["layers_per_step"] == 3
    assert result["choice_counts"] == dict.fromkeys(["net.fc1", "net.fc2", "net.fc3"], 4)  # every layer, every step
    assert sum(result["greedy_picks"].values()) == 4
    assert result["decrease_shares"].keys() == result["choice_counts"].keys()
    assert sum(result["decrease_shares"].values()) == pytest.approx(1.0)
    assert len(logged(result["metrics_csv"], "dsgd/layer")) == 4
    assert logged(result["metrics_csv"], "val/acc")
    assert result["png"] is not None and result["png"].stat().st_size > 10_000
    assert result["png"].parent == result["metrics_csv"].parent
    run = result["wandb_dir"]
    assert run is not None and run.name.startswith("offline-run-")
    assert any(f.stat().st_size > 0 for f in run.glob("run-*.wandb"))

    contrast = result["contrast"]
    assert contrast["constants"] == "data" and contrast["certified"] and contrast["layers_per_step"] == 1
    assert contrast["steps"] == 4 and sum(contrast["choice_counts"].values()) == 4
    assert contrast["choice_counts"] == contrast["greedy_picks"]  # one layer per step: the pick is the move
    assert contrast["png"] is not None and contrast["png"].parent == workdir / "logs" / "digits_data" / "version_0"
    assert contrast["wandb_dir"] is None and contrast["checkpoint"] is None  # one W&B run, one checkpoint
    out = capsys.readouterr().out
    assert "share of the estimated decrease | greedy pick" in out and "every layer moved at every step" in out
    table = out[out.index("constants     steps") :].splitlines()
    assert table[1].startswith("adaptive") and "no (estimated)" in table[1]
    assert table[2].startswith("data") and table[2].endswith("every step")


def test_epoch_table_shares_are_the_promised_decrease_of_the_moved_layers(capsys):
    """The share printed per layer is Σ_t ‖g_i‖²_*/L_i over the steps that moved layer i, over the
    total: a layer not moved contributes nothing, whatever its score."""
    from types import SimpleNamespace

    from examples.common import EpochTable
    from lightning_dsgd.optimizer import StepRecord

    table = EpochTable()
    optimizer = SimpleNamespace(layer_names=["a", "b", "c"], layers_per_step=3, selection_counts=[0, 0, 0])
    trainer = SimpleNamespace(optimizers=[optimizer], current_epoch=0, max_epochs=1, callback_metrics={})
    table.on_train_start(trainer, None)  # type: ignore[arg-type]
    table.on_train_epoch_start(trainer, None)  # type: ignore[arg-type]

    def step(scores: list[float], moved: tuple[int, ...], best: int) -> None:
        t = torch.tensor(scores)
        optimizer.last_step = StepRecord(
            step=0, layer=best, layer_name=None, scores=t, constants=t, dual_norms=t, stationarity=t[0],
            guaranteed_decrease=t.sum(), eta=1.0, selection="greedy", certified=False, skipped=False,
            skip_reason=None, loss=None, layers=moved,
        )  # fmt: skip
        table.on_train_batch_end(trainer, None, torch.tensor(1.0))  # type: ignore[arg-type]

    step([1.0, 2.0, 5.0], (0, 1, 2), best=2)
    step([3.0, 9.0, float("nan")], (0, 1), best=1)  # c not moved: its (NaN) score is left out
    table.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert table.shares() == pytest.approx({"a": 4 / 20, "b": 11 / 20, "c": 5 / 20})
    assert table.picks == [0, 1, 1]
    assert capsys.readouterr().out.splitlines()[-1].endswith("b:55% c:25% a:20% | c:1 b:1")


def test_the_checkpoint_the_guide_cites_is_written_by_the_demo_and_resumes(workdir):
    """docs/guide/checkpoints.md's path is where `make demo` (examples/digits.py) writes its last
    checkpoint, and the guide's command continues that run."""
    from examples import digits

    guide = (ROOT / "docs" / "guide" / "checkpoints.md").read_text()
    cited = set(re.findall(r"lightning_logs/digits/version_0/checkpoints/[\w.=-]+\.ckpt", guide))
    assert len(cited) == 1
    (path,) = cited
    result = digits.main(["--epochs", "1", "--max-steps", "3", "--wandb", "off", "--contrast", "off"])
    assert result["checkpoint"] == Path(path) and (workdir / path).is_file()
    assert f"--ckpt-path {path}" in guide  # the guide's command continues that run
    resumed = digits.main(["--max-steps", "5", "--wandb", "off", "--ckpt-path", path, "--contrast", "off"])
    assert resumed["steps"] == 5 and set(resumed["choice_counts"].values()) == {5}  # every layer, 5 steps


def test_digits_run_resumed_from_a_checkpoint_continues_exactly(workdir):
    """2 epochs, a checkpoint, then on to 4: the same weights as 4 epochs straight (the data module
    shuffles epoch e from seed + e, not from a generator that restarts on resume)."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from examples.digits import DigitsDataModule, DSGDTanhMLP
    from lightning_dsgd import DSGDSettings

    def fit(epochs: int, ckpt_path: Path | None = None, checkpoint: ModelCheckpoint | None = None) -> dict:
        seed_everything(0, verbose=False)
        model = DSGDTanhMLP(widths=[64, 32, 10], dsgd=DSGDSettings(selection="random", seed=1))
        trainer = Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            callbacks=[checkpoint] if checkpoint else [],
            enable_checkpointing=checkpoint is not None,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(model, DigitsDataModule(batch_size=128), ckpt_path=ckpt_path)
        return {key: value.clone() for key, value in model.state_dict().items()}

    straight = fit(4)
    fit(2, checkpoint=ModelCheckpoint(dirpath=workdir / "ckpt", filename="epoch2"))
    resumed = fit(4, ckpt_path=workdir / "ckpt" / "epoch2.ckpt")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_digits_script_without_wandb_logs_to_csv_only(workdir, monkeypatch, capsys):
    from examples import digits

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails
    result = digits.main(["--epochs", "2", "--batch-size", "0", "--norm", "linf", "--contrast", "off"])  # 1 step/epoch
    assert result["wandb_dir"] is None and result["steps"] == 2
    assert "wandb is not installed" in capsys.readouterr().out
    assert (workdir / "lightning_logs" / "digits" / "version_0" / "metrics.csv").is_file()


def test_before_and_after_adding_dsgd(workdir):
    from examples import add_dsgd

    results = add_dsgd.main(["--epochs", "1", "--max-steps", "3"])
    assert len(results) == 4 and all(0.0 <= r.accuracy <= 1.0 and r.steps == 3 for r in results.values())
    adam, *dsgd_runs = results.values()
    assert dsgd_runs[0] == dsgd_runs[1] == dsgd_runs[2]  # the three ways are the same DSGD run
    # the default (adaptive constants) moves every layer each step
    assert adam.choices is None and dsgd_runs[0].choices == {"net.fc1": 3, "net.fc2": 3, "net.fc3": 3}


@pytest.mark.slow
def test_adding_dsgd_prints_runs_that_visibly_differ_by_default(workdir, capsys):
    """The default run must not read as if DSGD did nothing: Adam's line differs from DSGD's."""
    from examples import add_dsgd

    adam, *dsgd_runs = add_dsgd.main([]).values()
    assert adam.accuracy != dsgd_runs[0].accuracy and adam.loss != dsgd_runs[0].loss
    lines = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line]
    assert len({line.split("accuracy")[1] for line in lines}) == 2  # Adam's, and the one DSGD run's


def test_plain_pytorch_digits_script(workdir):
    from examples import digits_mlp

    result = digits_mlp.main(["--epochs", "1", "--norm", "frobenius"])
    assert result["steps"] == 23 and result["skipped_steps"] == 0
    assert result["train_loss"] < result["initial_train_loss"]


# ---------------------------------------------------------------------- every config, through the CLI
def fake_data(config: str, workdir: Path) -> list[str]:
    """Arguments pointing a config at offline data (and, for W&B, at an absolute folder: the
    wandb service resolves relative folders against its own working directory)."""
    if config == "digits.yaml":
        loggers = yaml.safe_load((CONFIGS / config).read_text())["trainer"]["logger"]
        assert [x["class_path"].rsplit(".", 1)[1] for x in loggers] == ["CSVLogger", "WandbLogger"]
        assert loggers[1]["init_args"]["offline"] is True
        for logger in loggers:
            logger["init_args"]["save_dir"] = str(workdir / "lightning_logs")
        return [f"--trainer.logger={json.dumps(loggers)}"]
    if config.startswith("mnist"):
        return [f"--data.init_args.data_dir={write_fake_mnist(workdir / 'mnist')}", "--data.init_args.download=false"]
    if config.startswith("cifar10"):
        return [f"--data.init_args.data_dir={write_fake_cifar10(workdir / 'cifar')}", "--data.init_args.download=false"]
    return []


SINGLE_PROCESS = ["digits.yaml", "mnist.yaml", "mnist_full_batch.yaml", "cifar10.yaml", "char_transformer.yaml"]
MULTI_PROCESS = ["ddp.yaml", "fsdp2.yaml"]


def test_every_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SINGLE_PROCESS + MULTI_PROCESS)


@pytest.mark.parametrize("config", SINGLE_PROCESS)
def test_config_trains_through_the_cli(workdir, config):
    result = cli(["fit", "--config", str(CONFIGS / config), *TINY, *fake_data(config, workdir)])
    trainer, model = result.trainer, result.model
    assert trainer.global_step == 3
    assert isinstance(model, DSGDMixin) and isinstance(trainer.optimizers[0], DSGD)
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()  # the resolved config, saved by the CLI
    assert len(logged(log_dir / "metrics.csv", "dsgd/layer")) == 3
    assert (log_dir / "dsgd_layers.png").is_file()
    certified = trainer.optimizers[0].certified
    assert certified == (config in ("mnist.yaml", "mnist_full_batch.yaml"))  # digits.yaml: the defaults


def test_full_batch_config_checks_every_step_against_its_guarantee(workdir):
    args = ["--trainer.max_steps=4", "--trainer.max_epochs=4", *TINY[2:], *fake_data("mnist", workdir)]
    result = cli(["fit", "--config", str(CONFIGS / "mnist_full_batch.yaml"), *args])
    csv_path = Path(result.trainer.log_dir) / "metrics.csv"
    assert len(logged(csv_path, "dsgd/realized_decrease")) == 3  # known one step later
    assert logged(csv_path, "dsgd/bound_violations")[-1] == "0"


def test_char_transformer_samples_text(workdir):
    result = cli(["fit", "--config", str(CONFIGS / "char_transformer.yaml"), *TINY])
    sampler = next(c for c in result.trainer.callbacks if type(c).__name__ == "SampleText")
    assert sampler.text is not None and sampler.text.startswith("On the ")


def test_char_transformer_reads_any_text_file(workdir):
    text = workdir / "mine.txt"
    text.write_text("a small text of my own, repeated. " * 20)
    args = [f"--data.init_args.path={text}", "--data.init_args.block_size=16"]
    result = cli(["fit", "--config", str(CONFIGS / "char_transformer.yaml"), *TINY, *args])
    assert result.trainer.global_step == 3
    with pytest.raises(FileNotFoundError, match="No text file at"):
        cli(["fit", "--config", str(CONFIGS / "char_transformer.yaml"), *TINY, "--data.init_args.path=missing.txt"])


# ---------------------------------------------------------------------- data readers
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_are_read_exactly(tmp_path, gz):
    write_fake_mnist(tmp_path, n_train=5, n_test=3, gz=gz)
    raw = datasets.read_idx(next(tmp_path.glob("train-images-idx3-ubyte*")))
    assert raw.shape == (5, 28, 28) and raw.dtype == torch.uint8
    x_train, y_train, x_test, y_test = datasets.load_mnist(tmp_path, download_missing=False)
    assert x_train.shape == (5, 784) and x_test.shape == (3, 784) and y_train.shape == (5,) and y_test.shape == (3,)
    torch.testing.assert_close(x_train, raw.reshape(5, -1).float() / 255)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and int(y_train.max()) < 10


def test_idx_reader_handles_other_types_and_refuses_garbage(tmp_path):
    values = torch.arange(6, dtype=torch.int32).reshape(2, 3) - 2
    header = bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    path = tmp_path / "ints.idx"
    path.write_bytes(header + b"".join(int(v).to_bytes(4, "big", signed=True) for v in values.flatten()))
    assert torch.equal(datasets.read_idx(path), values)
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "junk")


def no_network(monkeypatch):
    def refuse(url, timeout=None):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", refuse)


def test_missing_mnist_says_where_to_put_which_files(tmp_path, monkeypatch):
    no_network(monkeypatch)
    with pytest.raises(DataNotFoundError) as error:
        datasets.ensure_mnist(tmp_path / "mnist")
    message = str(error.value)
    assert str((tmp_path / "mnist").resolve()) in message and "network unreachable (test)" in message
    for name in datasets.MNIST_FILES:
        assert f"{name}.gz" in message
    with pytest.raises(DataNotFoundError, match="downloads are off"):
        datasets.ensure_mnist(tmp_path / "mnist", download_missing=False)


def test_an_example_script_without_its_data_stops_with_the_instructions(workdir):
    from examples.common import run_config

    args = [f"--data.init_args.data_dir={workdir / 'nothing'}", "--data.init_args.download=false", *TINY]
    with pytest.raises(SystemExit, match=r"error: MNIST is not in .*nothing.*train-images-idx3-ubyte\.gz"):
        run_config("mnist.yaml", args)


def test_mnist_download_is_checked_against_its_checksum(tmp_path, monkeypatch):
    payload = gzip.compress(b"not mnist")
    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    reason = datasets.download(["https://example.invalid/a.gz"], tmp_path / "a.gz", md5="0" * 32)
    assert "checksum" in reason and not (tmp_path / "a.gz").exists()
    assert datasets.download(["https://example.invalid/a.gz"], tmp_path / "a.gz") is None
    assert (tmp_path / "a.gz").read_bytes() == payload and not list(tmp_path.glob("*.part"))


def test_cifar10_batches_and_archive(tmp_path, monkeypatch):
    no_network(monkeypatch)
    write_fake_cifar10(tmp_path / "made", n_per_batch=4)
    x_train, y_train, x_test, _ = datasets.load_cifar10(tmp_path / "made")
    assert x_train.shape == (20, 3, 32, 32) and x_test.shape == (4, 3, 32, 32) and x_train.dtype == torch.uint8
    assert y_train.shape == (20,) and int(y_train.max()) < 10
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / datasets.CIFAR10_ARCHIVE, "w:gz") as tar:
        tar.add(tmp_path / "made" / datasets.CIFAR10_FOLDER, arcname=datasets.CIFAR10_FOLDER)
    assert torch.equal(datasets.load_cifar10(archive_dir)[0], x_train)  # unpacked on first use
    with pytest.raises(DataNotFoundError, match=r"cifar-10-python\.tar\.gz.*network unreachable"):
        datasets.ensure_cifar10(tmp_path / "empty")


# ---------------------------------------------------------------------- scripts and multi-device runs
def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    ["mnist.py", "mnist.py --full-batch", "cifar10.py", "char_transformer.py"],
)
def test_example_script_runs_its_config(tmp_path, script):
    name, *flags = script.split()
    data = fake_data(name, tmp_path)
    result = run([sys.executable, "-m", f"examples.{name.removesuffix('.py')}", *flags, *TINY, *data], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The epoch table: steps per layer for one layer per step (MNIST: data constants); for every layer
    # per step (adaptive: CIFAR-10, the transformer), each layer's share of the decrease and the greedy pick.
    assert ("layer choices" if name == "mnist.py" else "share of the estimated decrease | greedy pick") in result.stdout
    assert list(tmp_path.glob("lightning_logs/*/version_0/metrics.csv"))


def test_an_example_run_as_a_file_says_how_to_run_it(tmp_path):
    result = run([sys.executable, str(ROOT / "examples" / "digits_mlp.py")], cwd=tmp_path)
    assert result.returncode == 1
    assert "Run the examples from the repository root as modules: python -m examples.digits_mlp" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config", MULTI_PROCESS)
def test_multi_device_config_runs_two_processes_through_the_cli(tmp_path, config):
    command = [sys.executable, "-m", "lightning_dsgd.cli", "fit", "--config", str(CONFIGS / config)]
    command += [*TINY[:3], "--trainer.max_steps=4", "--trainer.strategy.init_args.verify_every_n_steps=1"]
    result = run(command, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (log_dir,) = tmp_path.glob("lightning_logs/*/version_0")
    layers = logged(log_dir / "metrics.csv", "dsgd/layer")
    assert len(layers) == 4  # rank 0 logs; every step was verified identical on both ranks
    assert (log_dir / "dsgd_layers.png").is_file()
