"""The GPU paths: the registered strategy on the chosen device, every precision on the sketched
path (CUDA's linear algebra refuses half precision), TF32, optimizer state mapped to the GPU, a
default CUDA device, and the host synchronisations of a step. Skipped where no GPU is present;
run with ``pytest -m gpu`` on a GPU machine."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from helpers.lightning_models import Classifier, DSGDClassifier, RecordChoices
from helpers.models import classification_data, make_closure, mlp
from helpers.precision import applied_over_certified
from lightning.pytorch import Callback, Trainer

from lightning_dsgd import DSGD

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_trainer(tmp_path, devices=1, **kwargs) -> Trainer:
    return Trainer(
        accelerator="gpu",
        devices=devices,
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


def test_registered_single_device_strategy_runs_on_the_chosen_gpu(tmp_path):
    k = torch.cuda.device_count() - 1  # the last GPU: cuda:1 on a two-GPU machine
    module = Classifier()
    gpu_trainer(tmp_path, devices=[k], strategy="dsgd", max_steps=2).fit(module)
    assert module.net[0].weight.device == torch.device("cuda", k)


class AppliedStep(Callback):
    def __init__(self) -> None:
        self.before: list[torch.Tensor] | None = None
        self.results: list[tuple[float, float, bool, str | None]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = [p.detach().clone() for layer in pl_module.dsgd_optimizer.layers for p in layer.params]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dsgd = pl_module.dsgd_optimizer
        if dsgd.last_step is not None and not dsgd.last_step.skipped and self.before is not None:
            excess, allowance = applied_over_certified(dsgd, self.before)
            self.results.append((excess, allowance, dsgd.last_step.certified, dsgd.last_step.precision_reason))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"])
def test_cuda_precisions_on_the_sketched_path(tmp_path, precision):
    """hidden 96, batch 8: the middle block is sketched (QR and SVD of float32 on CUDA)."""
    record, probe = RecordChoices(), AppliedStep()
    model = DSGDClassifier(features=16, hidden=96, classes=4, batch_size=8)
    gpu_trainer(tmp_path, precision=precision, max_steps=8, callbacks=[record, probe]).fit(model)
    assert len(record.records) == 8
    assert all(r.scores.dtype == torch.float32 and r.scores.device.type == "cuda" for r in record.records)
    assert sum(not r.skipped for r in record.records) >= 6  # a GradScaler may skip its first steps
    for excess, allowance, certified, reason in probe.results:
        if precision.endswith("-true") and precision != "32-true":
            assert not certified and reason is not None  # parameters stored in 16 bits
            continue
        assert excess <= allowance, (excess, allowance)
        assert certified == (precision == "32-true" and torch.get_float32_matmul_precision() == "highest")


def test_tf32_is_not_claimed_and_dsgd_computes_without_it():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls, as Lightning suggests
    try:
        x, y = classification_data(8, 64, 10, dtype=torch.float32)
        x, y = x.cuda(), y.cuda()
        model = mlp([64, 512, 512, 10], dtype=torch.float32, seed=0).cuda()
        opt = DSGD(model)
        closure = make_closure(model, opt, x, y)
        for _ in range(6):
            before = [p.detach().clone() for layer in opt.layers for p in layer.params]
            opt.step(closure)
            assert torch.get_float32_matmul_precision() == "high"
            assert not opt.last_step.certified and "reduced float32 matmul" in opt.last_step.precision_reason
            excess, allowance = applied_over_certified(opt, before)
            assert excess <= allowance, (excess, allowance)
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("settings", [{"selection": "random"}, {"constants": "adaptive", "momentum": 0.5}])
def test_state_mapped_to_the_gpu_loads_and_continues(settings):
    x, y = classification_data(32, 6, 3, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    model = mlp([6, 16, 16, 3], dtype=torch.float32, seed=2).cuda()
    opt = DSGD(model, seed=4, **settings)
    closure = make_closure(model, opt, x, y)
    for _ in range(5):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(5):
        opt.step(closure)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cuda", weights_only=False)
    resumed_model = mlp([6, 16, 16, 3], dtype=torch.float32, seed=9).cuda()
    resumed_model.load_state_dict(saved["model"])
    resumed = DSGD(resumed_model, seed=4, **settings)
    resumed.load_state_dict(saved["opt"])
    resumed_closure = make_closure(resumed_model, resumed, x, y)
    for _ in range(5):
        resumed.step(resumed_closure)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_default_cuda_device_leaves_a_cpu_model_alone():
    x, y = classification_data(16, 6, 3, dtype=torch.float32)
    model = mlp([6, 64, 64, 3], dtype=torch.float32, seed=1)
    opt = DSGD(model, selection="random")
    closure = make_closure(model, opt, x, y)
    torch.set_default_device("cuda")
    try:
        for _ in range(4):
            opt.step(closure)
    finally:
        torch.set_default_device("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_host_synchronisations_come_from_the_choice_and_cusolver(monkeypatch):
    """One synchronisation for the choice; cuSOLVER's SVDs add their own (a convergence check and
    an error check per call): every other one would be a regression."""
    calls = {"linalg": 0}
    for name in ("svd", "svdvals", "qr", "matrix_norm"):
        real = getattr(torch.linalg, name)

        def counted(*args, _real=real, **kwargs):
            calls["linalg"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counted)
    x, y = classification_data(16, 64, 10, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    model = mlp([64, 256, 256, 10], dtype=torch.float32, seed=0).cuda()
    opt = DSGD(model)
    closure = make_closure(model, opt, x, y)
    for _ in range(3):
        opt.step(closure)
    syncs = []
    for _ in range(3):
        opt.zero_grad()
        closure()
        torch.cuda.synchronize()
        calls["linalg"] = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        n = sum("synchroniz" in str(w.message) for w in caught)
        syncs.append(n)
        print(f"host synchronisations: {n}, linear-algebra calls: {calls['linalg']}")
        assert 1 <= n <= 1 + 2 * calls["linalg"]
