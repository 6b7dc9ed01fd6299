"""The GPU paths: single device with the registered strategy, and CUDA mixed precision
(bf16-mixed, 16-mixed with a real CUDA GradScaler). Skipped where no GPU is present."""

from __future__ import annotations

import pytest
import torch
from helpers.lightning_models import Classifier, DSGDClassifier, RecordChoices
from lightning.pytorch import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_registered_single_device_strategy_follows_the_gpu(tmp_path):
    module = Classifier()
    gpu_trainer(tmp_path, strategy="dsgd", max_steps=3).fit(module)
    assert module.net[0].weight.device.type == "cuda" and module.dsgd_optimizer.steps_taken == 3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_cuda_precisions(tmp_path, precision):
    record = RecordChoices()
    model = DSGDClassifier()
    gpu_trainer(tmp_path, precision=precision, max_steps=8, callbacks=[record]).fit(model)
    assert len(record.records) == 8
    assert all(r.scores.dtype == torch.float32 and r.scores.device.type == "cuda" for r in record.records)
    assert sum(not r.skipped for r in record.records) >= 6  # a GradScaler may skip its first steps
