"""The constant regimes behind ``constants=`` (lightning_dsgd/constants.py, lightning_dsgd/adaptive.py):
the factory picks the right type for each (chain, mode), every regime speaks the one protocol the
optimizer uses, and checkpoints saved before the regimes were types resume bit-identically.

``python tests/test_constant_regimes.py OUT`` writes the checkpoints of ``CASES`` (run it with the
package of the commit to freeze on the path; ``data/checkpoints_0f04812.pt`` was written at 0f04812).
"""

from __future__ import annotations

import ast
import io
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.models import classification_data, make_closure, mlp
from torch import nn

from lightning_dsgd import DSGD
from lightning_dsgd.adaptive import AdaptiveConstants
from lightning_dsgd.constants import (
    ArchitectureConstants,
    CertifiedConstants,
    ConstantModel,
    EstimatedConstants,
)

FIXTURE = Path(__file__).parent / "data" / "checkpoints_0f04812.pt"


def relu_net() -> nn.Sequential:
    """Outside the rigorous class: estimated constants."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8, dtype=torch.float64), nn.ReLU(), nn.Linear(8, 3, dtype=torch.float64))


def tanh_net() -> nn.Sequential:
    return mlp([4, 6, 6, 3], seed=8)


#: name: (model, DSGD options, full batch) — one per regime, and the adaptive paths that keep state.
CASES: dict[str, tuple[Callable[[], nn.Module], dict, bool]] = {
    "certified data": (tanh_net, {"constants": "data", "norm": "spectral"}, False),
    "certified architecture": (tanh_net, {"constants": "architecture", "selection": "cyclic"}, False),
    "adaptive on a chain, momentum": (tanh_net, {"constants": "adaptive", "momentum": 0.9}, False),
    "adaptive on estimates": (relu_net, {"constants": "adaptive", "norm": "frobenius"}, False),
    "data off the chain": (relu_net, {"constants": "data", "momentum": 0.5}, False),
    "adaptive full batch, undo": (
        lambda: mlp([4, 6, 6, 3], seed=5, weight_scale=2.0),
        {"constants": "adaptive", "full_batch": True, "undo_shortfalls": True, "adaptive_options": {"floor": 1e-3}},
        True,
    ),
}
BEFORE, AFTER = 4, 5


def train(model: nn.Module, opt: DSGD, start: int, steps: int, full_batch: bool) -> list[int]:
    x, y = classification_data(64, 4, 3, seed=8, scale=2.0)
    batches = [(x, y)] if full_batch else list(zip(x.split(16), y.split(16), strict=True))
    chosen = []
    for t in range(start, start + steps):
        xb, yb = batches[t % len(batches)]
        opt.step(make_closure(model, opt, xb, yb))
        chosen.append(opt.last_step.layer)
    return chosen


def frozen(state: dict) -> dict:
    """``state`` as a checkpoint file holds it (the live state shares tensors with the optimizer)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def write_checkpoints(path: Path) -> None:
    """For each case: the model and optimizer after ``BEFORE`` steps, and what ``AFTER`` more gave."""
    out = {}
    for name, (build, options, full_batch) in CASES.items():
        model = build()
        opt = DSGD(model, seed=3, **options)
        train(model, opt, 0, BEFORE, full_batch)
        saved = frozen({"model": model.state_dict(), "opt": opt.state_dict()})
        chosen = train(model, opt, BEFORE, AFTER, full_batch)
        out[name] = {**saved, "chosen": chosen, "after": {k: v.clone() for k, v in model.state_dict().items()}}
    torch.save(out, path)


# ---------------------------------------------------------------------------- the regimes
PROTOCOL = sorted({*ConstantModel.__annotations__, *(name for name in vars(ConstantModel) if not name.startswith("_"))})


@pytest.mark.parametrize(
    ("build", "mode", "regime", "base", "ceiling"),
    [
        (tanh_net, "data", CertifiedConstants, None, None),
        (tanh_net, "architecture", ArchitectureConstants, None, None),
        (tanh_net, "adaptive", AdaptiveConstants, CertifiedConstants, 1.0),
        (relu_net, "data", AdaptiveConstants, EstimatedConstants, float("inf")),
        (relu_net, "adaptive", AdaptiveConstants, EstimatedConstants, float("inf")),
    ],
)
def test_the_regime_follows_the_chain_and_the_mode(build, mode, regime, base, ceiling):
    model = DSGD(build(), constants=mode).constant_model
    assert type(model) is regime
    assert model.certified == (base is None)
    if base is not None:
        assert type(model.base) is base and model.base.certified == (base is CertifiedConstants)
        assert model.ceiling == [ceiling] * len(model.layers)  # m ≤ 1: never above a certified bound


@pytest.mark.parametrize(("build", "mode"), [(tanh_net, "data"), (tanh_net, "architecture"), (relu_net, "data")])
def test_every_regime_speaks_the_whole_protocol(build, mode):
    model = DSGD(build(), constants=mode).constant_model
    regimes = [model] if model.certified else [model, model.base]
    for regime in regimes:
        assert [name for name in PROTOCOL if not hasattr(regime, name)] == []


def test_the_optimizer_uses_the_constant_model_through_the_protocol_only():
    import lightning_dsgd.optimizer as module

    tree = ast.parse(Path(module.__file__).read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "constant_model"
    }
    assert used and used <= set(PROTOCOL), used - set(PROTOCOL)


def test_a_reducer_set_on_the_optimizer_reaches_the_regime_that_measures():
    opt = DSGD(tanh_net())
    reducer = lambda t: t  # noqa: E731
    opt.reduce_max = reducer
    assert opt.constant_model.base.reduce_max is reducer and opt.constant_model.reduce_max is reducer
    assert opt.constant_model.recorder is opt.constant_model.base.recorder


def test_only_the_adaptive_regime_limits_a_step_and_grows():
    certified = DSGD(tanh_net(), constants="data").constant_model
    scale = torch.tensor(5.0, dtype=torch.float64)
    assert certified.limit(0, scale, torch.tensor(1.0, dtype=torch.float64)) is scale
    model = tanh_net()
    opt = DSGD(model, adaptive_options={"max_relative_step": 0.1})
    x, y = classification_data(16, 4, 3)
    opt.step(make_closure(model, opt, x, y))
    adaptive = opt.constant_model
    radius = adaptive.trust_region.radii[1]
    assert adaptive.limit(1, scale, torch.tensor(1.0, dtype=torch.float64)) == radius  # cut to the radius
    before = adaptive.multipliers.clone()
    adaptive.grow(1, 2.0)
    assert adaptive.multipliers[1] == min(2.0 * before[1], 1.0) and torch.equal(adaptive.multipliers[0], before[0])


@pytest.mark.parametrize(("build", "mode"), [(tanh_net, "data"), (tanh_net, "architecture")])
def test_a_certified_regime_measures_no_curvature_and_adjusts_nothing(build, mode):
    model = build()
    opt = DSGD(model, constants=mode)
    x, y = classification_data(16, 4, 3)
    opt.step(make_closure(model, opt, x, y))
    regime = opt.constant_model
    assert not regime.measures_curvature and dict(regime.pending) == {}
    grads = [(layer.weight.grad, layer.bias.grad) for layer in opt.layers]
    assert regime.curvatures(grads) == {}
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    dual_norms = torch.full((3,), 1e6, dtype=torch.float32)  # a trust region would raise the constants
    adjusted = regime.adjust(base, {0: torch.tensor(1e9)}, dual_norms, [1.0] * 3)
    assert adjusted.dtype == torch.float32 and torch.equal(adjusted, base.float())


def test_the_adaptive_curvature_is_the_exact_second_difference_of_a_quadratic_loss():
    """``κ = ⟨g(w + Δ) − g(w), Δ⟩ / ‖Δ‖²`` (Frobenius), which for a quadratic loss is
    ``(f(w + Δ) + f(w − Δ) − 2 f(w)) / ‖Δ‖²`` exactly."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, dtype=torch.float64)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    opt = DSGD(model, constants="adaptive", norm="frobenius", loss="mse")
    regime = opt.constant_model
    assert regime.measures_curvature

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    step = regime.pending[0].block()  # the block [ΔW, Δb] just taken
    closure()  # the gradient at w + Δ
    (grad,) = [(layer.weight.grad, layer.bias.grad) for layer in opt.layers]
    (curvature,) = regime.curvatures([grad]).values()

    def loss_at(shift: int) -> torch.Tensor:
        w, b = model.weight + shift * step[:, :-1], model.bias + shift * step[:, -1]
        return nn.functional.mse_loss(x @ w.T + b, y)

    with torch.no_grad():
        second_difference = loss_at(0) + loss_at(-2) - 2 * loss_at(-1)
    assert torch.allclose(curvature, second_difference / step.square().sum(), rtol=1e-9)


@pytest.mark.parametrize(
    ("full_batch", "options", "idle_shrink"),
    [(False, None, 0.9), (True, None, 0.8), (True, {"idle_shrink": 0.95}, 0.95)],
)
def test_full_batch_tries_idle_layers_sooner_unless_told_otherwise(full_batch, options, idle_shrink):
    opt = DSGD(relu_net(), full_batch=full_batch, adaptive_options=options)
    assert opt.constant_model.idle_shrink == idle_shrink


@pytest.mark.parametrize("mode", ["data", "architecture"])
def test_adaptive_options_are_refused_by_every_certified_regime(mode):
    with pytest.raises(ValueError, match=f"but constants='{mode}' are certified and fixed"):
        DSGD(tanh_net(), constants=mode, adaptive_options={"floor": 1e-2})


# ---------------------------------------------------------------------------- resuming old checkpoints
@pytest.mark.parametrize("name", list(CASES))
def test_checkpoints_saved_before_the_regimes_were_types_resume_identically(name):
    saved = torch.load(FIXTURE, weights_only=False)[name]
    build, options, full_batch = CASES[name]
    model = build()
    model.load_state_dict(saved["model"])
    opt = DSGD(model, seed=99, **options)
    opt.load_state_dict(saved["opt"])
    assert train(model, opt, BEFORE, AFTER, full_batch) == saved["chosen"]
    # Equal to the last bits of float64: since the fixture was written, σ_max is taken from the SVD
    # of the tall orientation (a faster LAPACK call, issue 12), which moves operator norms by ~1e-16.
    # A state field lost on load moves the weights by ~1e-2 (the trust region's bounds: 1.2e-2).
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["after"][key], rtol=1e-12, atol=0.0, msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_a_resumed_run_continues_bit_identically(name):
    build, options, full_batch = CASES[name]
    model, resumed_model = build(), build()
    opt = DSGD(model, seed=3, **options)
    train(model, opt, 0, BEFORE, full_batch)
    saved = frozen({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed_model.load_state_dict(saved["model"])
    resumed = DSGD(resumed_model, seed=99, **options)
    resumed.load_state_dict(saved["opt"])
    assert train(resumed_model, resumed, BEFORE, AFTER, full_batch) == train(model, opt, BEFORE, AFTER, full_batch)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


if __name__ == "__main__":
    write_checkpoints(Path(sys.argv[1]))
