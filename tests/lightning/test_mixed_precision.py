"""Lightning's precisions on the CPU, with CUDA's refusal of half-precision linear algebra
emulated: the step applied to the moved layer against ``η‖g‖_*/L``, and what the record claims."""

from __future__ import annotations

import pytest
import torch
from helpers.lightning_models import DSGDClassifier
from helpers.precision import applied_over_certified, cuda_like_linalg  # noqa: F401  (fixture)
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision


class AppliedStep(Callback):
    """Weights before each DSGD step (gradients are unscaled by then), the applied step after it."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] | None = None
        self.results: list[tuple[float, float, bool, str | None]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        dsgd = pl_module.dsgd_optimizer
        self.before = [p.detach().clone() for layer in dsgd.layers for p in layer.params]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dsgd = pl_module.dsgd_optimizer
        record = dsgd.last_step
        if record is None or record.skipped or self.before is None:
            return
        excess, allowance = applied_over_certified(dsgd, self.before)
        self.results.append((excess, allowance, record.certified, record.precision_reason))


def fit(tmp_path, precision) -> AppliedStep:
    probe = AppliedStep()
    # hidden 96, batch 8: the middle block (96 × 97) is sketched (k = 16 ≤ 0.6 · 96)
    model = DSGDClassifier(features=16, hidden=96, classes=4, batch_size=8)
    plugins = {}
    if precision == "16-mixed":  # on the CPU Lightning would turn "16-mixed" into bf16: ask for fp16 itself
        plugins = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    else:
        plugins = {"precision": precision}
    Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[probe],
        **plugins,
    ).fit(model)
    return probe


@pytest.mark.usefixtures("cuda_like_linalg")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_applied_step_within_its_bound(tmp_path, precision):
    probe = fit(tmp_path, precision)
    assert len(probe.results) >= 6
    for excess, allowance, certified, reason in probe.results:
        assert excess <= allowance, (excess, allowance)
        if precision == "32-true":
            assert certified and reason is None
        else:  # the gradient is that of the autocast forward: nothing is claimed
            assert not certified and "autocast" in reason


@pytest.mark.usefixtures("cuda_like_linalg")
@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_low_precision_parameters_claim_nothing(tmp_path, precision):
    probe = fit(tmp_path, precision)
    assert len(probe.results) >= 6
    name = "bfloat16" if precision.startswith("bf16") else "float16"
    assert all(not certified and name in reason for _, _, certified, reason in probe.results)
