"""What a GPU would meet, emulated on the CPU (issue 16): parameters on another device, a default
device, host synchronisations, CUDA's refusal of half-precision linear algebra under autocast,
reduced float32 matmul precision, and optimizer state mapped to another device.

Parameters on the ``meta`` device stand for parameters on a GPU (:mod:`helpers.devices`): every
tensor DSGD makes must follow them, and :class:`~helpers.devices.MetaHost` counts each read to the
host (a synchronisation on a GPU) and each copy of host data to the device.
"""

from __future__ import annotations

import io

import pytest
import torch
from helpers.architectures import ReluCNN, TinyTransformer
from helpers.devices import MetaHost, host_reads_per_step
from helpers.models import classification_data, make_closure, mlp
from helpers.precision import HALF, applied_over_certified, cuda_like_linalg  # noqa: F401  (fixture)
from torch import nn

import lightning_dsgd.geometry as geometry_module
from lightning_dsgd import DSGD

# --------------------------------------------------------------------------- the parameters' device


def _draw_on_device(monkeypatch):
    """A CUDA device draws the sketch on its own generator; meta has none (DSGD would draw on the
    CPU and copy): emulate the CUDA branch."""

    def draw(size, generator, device, dtype):
        return torch.randn(size, device=device, dtype=dtype)

    monkeypatch.setattr(geometry_module, "_randn", draw)


def _mlp_case(batch: int, **settings):
    def build():
        model = mlp([32, 128, 128, 10], dtype=torch.float32).to("meta")
        x = torch.randn(batch, 32, device="meta")
        y = torch.zeros(batch, dtype=torch.long, device="meta")
        return model, settings, lambda: nn.functional.cross_entropy(model(x), y)

    return build


def _unused_embedding_case():
    """An embedding that gets no gradient is the only "rows" layer: its group is all-None."""

    def build():
        net = mlp([8, 16, 3], dtype=torch.float32)
        holder = nn.ModuleDict({"net": net, "unused": nn.Embedding(5, 4)}).to("meta")
        x = torch.randn(16, 8, device="meta")
        y = torch.zeros(16, dtype=torch.long, device="meta")
        return holder, {}, lambda: nn.functional.cross_entropy(holder["net"](x), y)

    return build


def _architecture_case(model_cls, x_shape, y_shape, classes):
    def build():
        torch.manual_seed(0)
        model = model_cls().to("meta")
        if model_cls is ReluCNN:
            x = torch.randn(x_shape, device="meta")
        else:
            x = torch.zeros(x_shape, dtype=torch.long, device="meta")
        y = torch.zeros(y_shape, dtype=torch.long, device="meta")
        return model, {}, lambda: nn.functional.cross_entropy(model(x).reshape(-1, classes), y.reshape(-1))

    return build


#: Blocking reads + host-to-device copies per step once warm (the first steps also copy the
#: constants that ``device_constant`` caches; the docs state these numbers).
CASES = {
    "default (spectral, data, tanh MLP; exact SVDs)": (_mlp_case(256), 1),
    "default, sketched (batch 16)": (_mlp_case(16), 1),
    "architecture constants": (_mlp_case(16, constants="architecture"), 1),
    "adaptive constants": (_mlp_case(16, constants="adaptive"), 1),
    "frobenius": (_mlp_case(64, norm="frobenius"), 1),
    "linf": (_mlp_case(64, norm="linf"), 1),
    "random selection": (_mlp_case(64, selection="random"), 1),
    "cyclic selection": (_mlp_case(64, selection="cyclic"), 1),
    "momentum": (_mlp_case(64, momentum=0.5), 1),
    "two layers per step": (_mlp_case(64, layers_per_step=2), 1),
    "an embedding without gradient": (_unused_embedding_case(), 1),
    "transformer": (_architecture_case(TinyTransformer, (4, 8), (4, 8), 12), 1),
    "CNN": (_architecture_case(ReluCNN, (8, 1, 8, 8), (8,), 3), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_follows_the_parameters_and_one_host_sync_per_step(monkeypatch, case):
    """On main the frozen-only group, the sketch's Gaussian matrix and the shape groups' index
    tensors were made on the CPU: mixing them with the parameters' device failed (or, on a GPU,
    cost a synchronising copy each)."""
    _draw_on_device(monkeypatch)
    build, expected = CASES[case]
    model, settings, loss_fn = build()
    opt = DSGD(model, **settings)
    per_step, host = host_reads_per_step(opt, loss_fn, 6)
    assert per_step[3:] == [expected] * 3, (per_step, dict(host.syncs), dict(host.uploads))


def test_full_batch_undo_adds_one_sync_for_its_decision(monkeypatch):
    _draw_on_device(monkeypatch)
    model, _, loss_fn = _mlp_case(64)()
    opt = DSGD(model, full_batch=True, undo_shortfalls=True)
    counts = []
    for _ in range(5):
        opt.zero_grad()
        with torch.enable_grad():
            loss = loss_fn()
            loss.backward()
        with MetaHost() as host:
            opt.step(loss=loss.detach())
        counts.append(host.total)
    # The choice, and whether to undo the previous step (one read, the message's numbers with it).
    # MetaHost's made-up losses always fall short: every checked step is undone, so every other
    # step has no previous step to check.
    assert counts[1:] == [2, 1, 2, 1]


def test_a_default_device_changes_nothing():
    """Everything DSGD makes names its device: under torch.set_default_device("meta") (standing
    for "cuda") a CPU model trains exactly as without it."""
    x, y = classification_data(16, 6, 3, dtype=torch.float32)

    def run(default: str | None) -> list[torch.Tensor]:
        model = mlp([6, 64, 64, 3], dtype=torch.float32, seed=1)
        for settings in ({"selection": "random"}, {"constants": "adaptive", "momentum": 0.5}):
            opt = DSGD(model, seed=5, **settings)
            closure = make_closure(model, opt, x, y)
            previous = torch.get_default_device()
            torch.set_default_device(default or previous)
            try:
                for _ in range(4):
                    opt.step(closure)
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt.load_state_dict(torch.load(buffer, weights_only=False))
            finally:
                torch.set_default_device(previous)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(None), run("meta"), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- state on another device


class OnAnotherDevice(torch.Tensor):
    """A CPU tensor standing for one that ``torch.load(map_location="cuda")`` put on a GPU: only an
    explicit move (``.to(device)``, ``.cpu()``) gives back a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func in (torch.Tensor.cpu, torch.Tensor.to) and isinstance(out, cls):
            return out.as_subclass(torch.Tensor)
        return out


def _map(tree):
    if isinstance(tree, torch.Tensor):
        return tree.as_subclass(OnAnotherDevice)
    if isinstance(tree, dict):
        return {k: _map(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v) for v in tree)
    return tree


class StrictGenerator:
    """``torch.Generator`` as CUDA builds see it: ``set_state`` takes a CPU ByteTensor only."""

    def __init__(self, generator: torch.Generator) -> None:
        self._generator = generator

    def set_state(self, state: torch.Tensor) -> None:
        if type(state) is not torch.Tensor or state.device.type != "cpu" or state.dtype != torch.uint8:
            raise TypeError("expected a torch.ByteTensor (CPU), got the state on another device")
        self._generator.set_state(state)

    def __getattr__(self, name):
        return getattr(self._generator, name)


@pytest.mark.parametrize("settings", [{"selection": "random"}, {"constants": "adaptive", "momentum": 0.5}])
def test_state_mapped_to_another_device_loads_and_continues_identically(settings):
    x, y = classification_data(32, 6, 3, dtype=torch.float32)
    model = mlp([6, 16, 16, 3], dtype=torch.float32, seed=2)
    opt = DSGD(model, seed=4, **settings)
    closure = make_closure(model, opt, x, y)
    for _ in range(5):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(5):
        opt.step(closure)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = mlp([6, 16, 16, 3], dtype=torch.float32, seed=9)
    resumed_model.load_state_dict(saved["model"])
    resumed = DSGD(resumed_model, seed=4, **settings)
    strict = StrictGenerator(resumed._generator)
    resumed._generator = strict  # type: ignore[assignment]
    resumed.load_state_dict(_map(saved["opt"]))
    resumed._generator = strict._generator
    resumed_closure = make_closure(resumed_model, resumed, x, y)
    for _ in range(5):
        resumed.step(resumed_closure)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- precision


def _snapshot(opt: DSGD) -> list[torch.Tensor]:
    return [p.detach().clone() for layer in opt.layers for p in layer.params]


@pytest.mark.usefixtures("cuda_like_linalg")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch", [8, 128], ids=["sketched", "exact"])
def test_autocast_step_runs_in_float32_and_claims_nothing(dtype, batch):
    """Lightning steps DSGD inside training_step, under autocast: the step must neither crash on
    CUDA's half-precision refusal nor compute its direction in half precision (on main the
    applied step was 0.45–0.82 % above its bound under bf16)."""
    x, y = classification_data(batch, 16, 4, dtype=torch.float32)
    model = mlp([16, 96, 96, 4], dtype=torch.float32, seed=3)
    opt = DSGD(model)
    for _ in range(6):
        before = _snapshot(opt)
        with torch.autocast("cpu", dtype=dtype):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        record = opt.last_step
        assert record.dual_norms.dtype == torch.float32 and record.constants.dtype == torch.float32
        assert "autocast" in record.precision_reason and not record.certified
        excess, allowance = applied_over_certified(opt, before)
        assert excess <= allowance, (excess, allowance)


def test_reduced_matmul_precision_keeps_dsgd_exact_and_claims_nothing():
    """torch.set_float32_matmul_precision("medium") (Lightning suggests "high" to GPU users) makes
    float32 matmuls bfloat16 on a CPU with AMX, as TF32 does on a GPU: DSGD's own direction stays
    IEEE float32, the user's flag survives, and the record names why the step is not certified."""
    x, y = classification_data(8, 16, 4, dtype=torch.float32)
    model = mlp([16, 96, 96, 4], dtype=torch.float32, seed=3)
    opt = DSGD(model, constants="data")
    closure = make_closure(model, opt, x, y)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        for _ in range(6):
            before = _snapshot(opt)
            opt.step(closure)
            assert torch.get_float32_matmul_precision() == "medium"
            excess, allowance = applied_over_certified(opt, before)
            assert excess <= allowance, (excess, allowance)
            assert "reduced float32 matmul precision" in opt.last_step.precision_reason
            assert not opt.last_step.certified
    finally:
        torch.set_float32_matmul_precision(previous)
    opt.step(closure)  # back at "highest": certified again
    assert opt.last_step.certified and opt.last_step.precision_reason is None


@pytest.mark.usefixtures("cuda_like_linalg")
@pytest.mark.parametrize("dtype", HALF)
def test_low_precision_parameters_are_not_certified(dtype):
    x, y = classification_data(16, 6, 3, dtype=dtype)
    model = mlp([6, 32, 3], dtype=dtype, seed=1)
    opt = DSGD(model)
    opt.step(make_closure(model, opt, x, y))
    record = opt.last_step
    assert record.dual_norms.dtype == torch.float32
    assert not record.certified and str(dtype).removeprefix("torch.") in record.precision_reason


@pytest.mark.usefixtures("cuda_like_linalg")
def test_float16_nuclear_norms_do_not_overflow():
    """Entries of 200 in a 64 × 65 float16 gradient: its nuclear norm (≈ 1e5) is past float16's
    65504, and is reduced in float32 — on the exact and on the sketched path, under autocast too."""
    g = torch.Generator().manual_seed(0)
    weight = (200 * torch.randn(64, 64, generator=g).clamp(-3, 3)).half()
    bias = (200 * torch.randn(64, generator=g).clamp(-3, 3)).half()
    reference = torch.linalg.matrix_norm(torch.cat([weight, bias.unsqueeze(1)], 1).double(), ord="nuc").item()
    assert reference > 65504
    spectral = geometry_module.SpectralGeometry()
    for rank_bound in (None, 56):
        with torch.autocast("cpu", dtype=torch.float16):
            from lightning_dsgd.precision import full_precision

            with full_precision(["cpu"]):
                value = spectral.dual_norms_and_bases([(weight, bias)], [rank_bound])[0][0]
        assert value.dtype == torch.float32 and torch.isfinite(value)
        if rank_bound is None:
            assert value.item() == pytest.approx(reference, rel=1e-5)
        else:  # a sketch of a full-rank block: a certified lower bound
            assert value.item() <= reference * (1 + 1e-5)


def test_autocast_forward_is_noticed_when_the_step_runs_outside_it():
    """Plain PyTorch: ``with autocast(): loss = model(x)``, then ``backward`` and ``step`` outside."""
    x, y = classification_data(16, 6, 3, dtype=torch.float32)
    model = mlp([6, 32, 3], dtype=torch.float32, seed=1)
    opt = DSGD(model, constants="data")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step(loss=loss)
    assert not opt.last_step.certified and "autocast" in opt.last_step.precision_reason
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step(loss=loss)
    assert opt.last_step.certified and opt.last_step.precision_reason is None
