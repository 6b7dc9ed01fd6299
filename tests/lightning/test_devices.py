"""Every DSGD strategy runs on the device the Trainer was given (``devices=[k]``), checked on the
CPU with Lightning's CUDA device count faked (the Trainer is only built, never fitted)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

import lightning_dsgd  # noqa: F401  (registers the strategies)
from lightning_dsgd.lightning.strategy import DSGDSingleDeviceStrategy


@pytest.fixture
def two_gpus(monkeypatch):
    """What Lightning's own tests do (``mock_cuda_count``): the connector sees two CUDA devices."""
    import lightning.fabric.accelerators.cuda as fabric_cuda
    import lightning.pytorch.accelerators.cuda as pytorch_cuda

    monkeypatch.setattr(fabric_cuda, "num_cuda_devices", lambda: 2)
    monkeypatch.setattr(pytorch_cuda, "num_cuda_devices", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # where main's root_device looked


def build(**kwargs) -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)


@pytest.mark.parametrize(("devices", "expected"), [([1], "cuda:1"), ([0], "cuda:0"), (1, "cuda:0")])
def test_single_device_strategy_runs_on_the_chosen_gpu(two_gpus, devices, expected):
    trainer = build(accelerator="gpu", devices=devices, strategy="dsgd")
    assert isinstance(trainer.strategy, DSGDSingleDeviceStrategy)
    assert trainer.strategy.root_device == torch.device(expected)


def test_single_device_strategy_instance_follows_devices_too(two_gpus):
    trainer = build(accelerator="gpu", devices=[1], strategy=DSGDSingleDeviceStrategy())
    assert trainer.strategy.root_device == torch.device("cuda:1")


def test_an_explicit_device_wins(two_gpus):
    trainer = build(accelerator="gpu", devices=[1], strategy=DSGDSingleDeviceStrategy(device="cuda:0"))
    assert trainer.strategy.root_device == torch.device("cuda:0")


def test_single_device_strategy_refuses_several_devices(two_gpus):
    with pytest.raises(ValueError, match="strategy='dsgd' runs on one device"):
        build(accelerator="gpu", devices=2, strategy="dsgd")


@pytest.mark.parametrize("strategy", ["dsgd_ddp", "dsgd_ddp_spawn"])
def test_data_parallel_strategies_run_on_the_chosen_gpu(two_gpus, strategy):
    trainer = build(accelerator="gpu", devices=[1], strategy=strategy)
    assert trainer.strategy.root_device == torch.device("cuda:1")


def test_cpu_stays_on_the_cpu():
    assert build(accelerator="cpu", devices=1, strategy="dsgd").strategy.root_device == torch.device("cpu")
