"""DSGD.step: selection, the update rule, guarantees, state, and errors
(docs/theory.md, "The algorithm"; docs/theory.md, "The guarantees")."""

from __future__ import annotations

import copy
import io
import math
import re

import numpy as np
import pytest
import torch
from helpers.models import classification_data, full_batch_loss, make_closure, mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dsgd import DSGD

NORMS = ["spectral", "frobenius", "linf"]
MODES = ["data", "architecture"]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_direction(norm: str, g: np.ndarray) -> np.ndarray:
    """ρ(G) computed independently with numpy (docs/theory.md, "Norms, dual norms and duality maps")."""
    if norm == "frobenius":
        return g
    if norm == "spectral":
        u, s, vh = np.linalg.svd(g, full_matrices=False)
        rank = int((s > s[0] * max(g.shape) * np.finfo(g.dtype).eps).sum())  # numerical rank, as matrix_rank
        return s[:rank].sum() * u[:, :rank] @ vh[:rank]
    out = np.zeros_like(g)
    cols = np.abs(g).argmax(1)
    rows = np.arange(g.shape[0])
    out[rows, cols] = np.abs(g).max(1).sum() * np.sign(g[rows, cols])
    return out


def reference_dual_norm(norm: str, g: np.ndarray) -> float:
    if norm == "frobenius":
        return float(np.sqrt((g**2).sum()))
    if norm == "spectral":
        s = np.linalg.svd(g, compute_uv=False)
        return float(s[s > s[0] * max(g.shape) * np.finfo(g.dtype).eps].sum())
    return float(np.abs(g).max(1).sum())


# ---------------------------------------------------------------------------- one step
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", MODES)
def test_step_updates_only_the_best_layer_by_the_rule(norm, mode):
    model = mlp([5, 7, 6, 3], "tanh", seed=1)
    x, y = classification_data(32, 5, 3, seed=1)
    opt = DSGD(model, norm=norm, constants=mode, eta=0.7)
    before = snapshot(model)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = full_batch_loss(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert (calls == [1] and loss is not None and loss.requires_grad is False) or loss.grad_fn is not None
    rec = opt.last_step
    grads = [np.concatenate([lay.weight.grad.numpy(), lay.bias.grad.numpy()[:, None]], 1) for lay in opt.layers]
    dual = [reference_dual_norm(norm, g) for g in grads]
    np.testing.assert_allclose(rec.dual_norms.numpy(), dual, rtol=1e-10)
    scores = np.array(dual) ** 2 / rec.constants.numpy()
    np.testing.assert_allclose(rec.scores.numpy(), scores, rtol=1e-10)
    assert rec.layer == int(np.argmax(scores)) and rec.layer_name == opt.layer_names[rec.layer]
    assert rec.stationarity.item() == pytest.approx(math.sqrt(scores.max()), rel=1e-12)
    assert rec.guaranteed_decrease.item() == pytest.approx(0.7 * (1 - 0.35) * scores.max(), rel=1e-12)
    assert rec.certified and not rec.skipped and rec.skip_reason is None and rec.eta == 0.7

    after = snapshot(model)
    chosen = opt.layers[rec.layer].name
    for key, value in before.items():
        if not key.startswith(chosen + "."):
            assert torch.equal(after[key], value), f"{key} changed although layer {chosen} was chosen"
    step = 0.7 / rec.constants[rec.layer].item() * reference_direction(norm, grads[rec.layer])
    new = np.concatenate([before[f"{chosen}.weight"].numpy(), before[f"{chosen}.bias"].numpy()[:, None]], 1) - step
    got = np.concatenate([after[f"{chosen}.weight"].numpy(), after[f"{chosen}.bias"].numpy()[:, None]], 1)
    np.testing.assert_allclose(got, new, rtol=1e-12, atol=1e-14)


def test_layers_are_found_in_forward_order_with_qualified_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Sequential(nn.Linear(5, 6), nn.Sigmoid()), nn.Linear(6, 2)
            )

        def forward(self, x):
            return self.body(x)

    opt = DSGD(Net())
    assert opt.layer_names == ["body.1", "body.3.0", "body.4"]
    assert [g["name"] for g in opt.param_groups] == opt.layer_names


def test_a_declared_chain_for_a_hand_written_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(6, 3)  # registered first, runs last
            self.inp = nn.Linear(4, 6)

        def forward(self, x):
            return self.out(torch.tanh(self.inp(x)))

    net = Net()
    undeclared = DSGD(net)  # trains, but outside the rigorous class as far as DSGD can tell
    assert not undeclared.certified and "contains no nn.Sequential" in undeclared.not_rigorous_reason
    opt = DSGD(net, chain=[net.inp, nn.Tanh(), net.out], constants="data")
    assert opt.certified
    assert opt.layer_names == ["inp", "out"]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.step(make_closure(net, opt, x, y))
    assert opt.last_step.layer in (0, 1)


def test_frozen_layers_and_biases_are_left_alone():
    model = mlp([4, 5, 5, 3], seed=0)
    model[4].bias.requires_grad_(False)
    opt = DSGD(model)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2, 1]
    model[0].requires_grad_(False)
    opt = DSGD(model)
    assert opt.layer_names == ["2", "4"] and "frozen nn.Linear inside the chain" in opt.not_rigorous_reason


# ---------------------------------------------------------------------------- selection rules
def run(model, opt, x, y, steps):
    closure = make_closure(model, opt, x, y)
    losses, layers = [], []
    for _ in range(steps):
        losses.append(opt.step(closure).item())
        layers.append(opt.last_step.layer)
    return losses, layers


def test_cyclic_and_random_selection():
    x, y = classification_data(32, 4, 3, seed=2)
    model = mlp([4, 6, 6, 3], seed=2)
    _, layers = run(model, DSGD(model, selection="cyclic"), x, y, 7)
    assert layers == [0, 1, 2, 0, 1, 2, 0]

    picks = []
    for seed in (5, 5, 6):
        model = mlp([4, 6, 6, 3], seed=2)
        picks.append(run(model, DSGD(model, selection="random", seed=seed), x, y, 60)[1])
    assert picks[0] == picks[1] != picks[2]
    assert set(picks[0]) == {0, 1, 2}


def test_selection_counts_and_steps_are_counted():
    x, y = classification_data(32, 4, 3, seed=2)
    model = mlp([4, 6, 3], seed=2)
    opt = DSGD(model, constants="data")
    _, layers = run(model, opt, x, y, 10)
    assert opt.selection_counts == [layers.count(0), layers.count(1)]
    assert opt.steps_taken == 10 and opt.last_step.step == 9


# ---------------------------------------------------------------------------- guarantees
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("selection", ["greedy", "random", "cyclic"])
@pytest.mark.parametrize("eta", [0.5, 1.0, 1.5])
def test_full_batch_loss_decreases_by_at_least_the_guarantee(norm, mode, selection, eta):
    model = mlp([6, 10, 8, 4], "tanh" if eta != 1.5 else "sigmoid", seed=4, weight_scale=1.5)
    x, y = classification_data(128, 6, 4, seed=4, scale=2.0)
    opt = DSGD(model, norm=norm, constants=mode, selection=selection, eta=eta)
    closure = make_closure(model, opt, x, y)
    loss = opt.step(closure).item()
    first = loss
    for _ in range(40):
        promised = opt.last_step.guaranteed_decrease.item()
        new = opt.step(closure).item()
        assert loss - new >= promised * (1 - 1e-9) - 1e-15, (loss, new, promised)
        loss = new
    assert loss < first


def test_stationarity_sum_is_bounded_by_the_initial_gap():
    """docs/theory.md, "The guarantees": Σ_t ‖∇f(w_t)‖²_{w_t*} ≤ (f(w_0) − f(w_T)) / (η(1−η/2))."""
    model = mlp([6, 10, 4], seed=5)
    x, y = classification_data(64, 6, 4, seed=5)
    opt = DSGD(model)
    closure = make_closure(model, opt, x, y)
    f0 = opt.step(closure).item()
    total = opt.last_step.stationarity.item() ** 2
    for _ in range(30):
        opt.step(closure)
        total += opt.last_step.stationarity.item() ** 2
    f_end = full_batch_loss(model, x, y).item()
    assert total <= 2 * (f0 - f_end) * (1 + 1e-9)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", MODES)
def test_stochastic_loop_on_the_whole_data_set_equals_the_full_batch_loop(norm, mode):
    x, y = classification_data(96, 5, 3, seed=6)
    full = mlp([5, 8, 8, 3], seed=6)
    opt_full = DSGD(full, norm=norm, constants=mode)
    closure = make_closure(full, opt_full, x, y)
    stoch = mlp([5, 8, 8, 3], seed=6)
    opt_stoch = DSGD(stoch, norm=norm, constants=mode)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=True)
    for _epoch in range(15):
        opt_full.step(closure)
        for xb, yb in loader:  # one batch holding every example, shuffled
            opt_stoch.zero_grad()
            nn.functional.cross_entropy(stoch(xb), yb).backward()
            opt_stoch.step()
        assert opt_stoch.last_step.layer == opt_full.last_step.layer
        torch.testing.assert_close(opt_stoch.last_step.scores, opt_full.last_step.scores, rtol=1e-9, atol=1e-12)
    for a, b in zip(full.parameters(), stoch.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- bad input
def test_nonfinite_gradient_skips_without_touching_weights():
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model)
    before = snapshot(model)

    def closure():
        opt.zero_grad()
        loss = full_batch_loss(model, x, y)
        loss.backward()
        model[2].weight.grad[1, 2] = float("nan")
        return loss

    opt.step(closure)
    rec = opt.last_step
    assert rec.skipped and rec.layer is None and not rec.certified
    assert "non-finite gradient" in rec.skip_reason and "'2'" in rec.skip_reason
    assert rec.guaranteed_decrease.item() == 0.0 and opt.skipped_steps == 1
    for k, v in snapshot(model).items():
        assert torch.equal(v, before[k])
    opt.step(make_closure(model, opt, x, y))  # a clean step afterwards works
    assert not opt.last_step.skipped


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_policy_raise(norm, bad):
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model, norm=norm, nonfinite="raise")
    before = snapshot(model)
    opt.zero_grad()
    full_batch_loss(model, x, y).backward()
    model[0].bias.grad[0] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .* \['0'\].*No weight was changed"):
        opt.step()
    for k, v in snapshot(model).items():
        assert torch.equal(v, before[k])


def test_zero_gradient_is_a_skipped_step():
    model = mlp([4, 6, 3], seed=0)
    x, _ = classification_data(16, 4, 3)
    opt = DSGD(model)
    model(x)  # records input norms; no backward at all
    opt.step()
    assert opt.last_step.skipped and "zero or missing" in opt.last_step.skip_reason


def test_data_mode_needs_a_forward_with_gradients():
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model)
    opt.zero_grad()
    full_batch_loss(model, x, y).backward()
    opt.step()
    with torch.no_grad():
        model(x * 100)  # evaluation passes are not recorded
    with pytest.raises(RuntimeError, match="no forward pass with gradients enabled ran since the last step"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": 0.0}, "eta must be a number in"),
        ({"eta": 2.0}, "eta must be a number in"),
        ({"eta": float("nan")}, "eta must be a number in"),
        ({"norm": "l1"}, "Unknown norm 'l1'"),
        ({"constants": "tight"}, "Unknown constants='tight'"),
        ({"selection": "best"}, "Unknown selection='best'"),
        ({"nonfinite": "ignore"}, "Unknown nonfinite='ignore'"),
        ({"loss": "hinge"}, "Unsupported loss 'hinge'"),
        ({"data_bound": 3.0}, "data_bound is used only with constants='architecture'"),
        ({"data_bound": -1.0, "constants": "architecture"}, "data_bound must be a finite number"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSGD(mlp([3, 4, 2]), **kwargs)


def test_eta_from_a_scheduler_is_used_and_checked():
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model, eta=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    closure = make_closure(model, opt, x, y)
    opt.step(closure)
    sched.step()
    opt.step(closure)
    assert opt.last_step.eta == 0.5
    for group in opt.param_groups:
        group["lr"] = 3.0
    with pytest.raises(ValueError, match="eta must be a number in"):
        opt.step(closure)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), r"'1' \(ReLU\) is not a supported activation"),
        (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), r"'0' \(Conv1d\) is not a whole nn.Linear"),
        (nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), "with no activation between them"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh()), "needs linear logits"),
        (nn.Sequential(nn.Tanh(), nn.Linear(3, 2)), "comes before the first nn.Linear"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sigmoid(), nn.Linear(4, 2)), "second activation"),
    ],
)
def test_models_outside_the_rigorous_class_are_named_and_not_certified(model, match):
    opt = DSGD(model)
    assert not opt.certified and re.search(match, opt.not_rigorous_reason)
    x = torch.randn(8, 1, 3) if isinstance(model[0], nn.Conv1d) else torch.randn(8, 3)
    y = torch.randint(0, 2, (8,))
    opt.step(make_closure(model, opt, x, y))
    assert not opt.last_step.certified and not opt.last_step.skipped
    with pytest.raises(ValueError, match="constants='architecture' exists only for the rigorous class") as info:
        DSGD(model, constants="architecture")
    assert re.search(match, str(info.value)) and "Tanh or nn.Sigmoid" in str(info.value)


def test_trainable_parameter_outside_the_chain_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            self.head = nn.Linear(2, 2)

    opt = DSGD(Net())
    assert not opt.certified and "'head' is not part of the layer chain" in opt.not_rigorous_reason


def test_no_trainable_layer_and_parameters_instead_of_a_model():
    model = mlp([3, 4, 2]).requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable layer"):
        DSGD(model)
    with pytest.raises(TypeError, match=r"DSGD\(model\) rather than DSGD\(model.parameters\(\)\)"):
        DSGD(mlp([3, 4, 2]).parameters())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- state
@pytest.mark.parametrize("selection", ["random", "cyclic", "greedy"])
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_continues_identically(selection, mode):
    x, y = classification_data(64, 4, 3, seed=8)
    loader_gen = torch.Generator().manual_seed(0)
    batches = [(x[idx], y[idx]) for idx in torch.randperm(64, generator=loader_gen).split(16)]

    def train(model, opt, steps, start):
        out = []
        for t in range(start, start + steps):
            xb, yb = batches[t % len(batches)]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            out.append(opt.last_step.layer)
        return out

    model = mlp([4, 6, 6, 3], seed=8)
    opt = DSGD(model, selection=selection, constants=mode, seed=3)
    train(model, opt, 5, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    uninterrupted = train(model, opt, 9, 5)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = mlp([4, 6, 6, 3], seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = DSGD(resumed_model, selection=selection, constants=mode, seed=12345)
    resumed.load_state_dict(saved["opt"])
    assert resumed.steps_taken == 5
    assert train(resumed_model, resumed, 9, 5) == uninterrupted
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.selection_counts == opt.selection_counts


@pytest.mark.parametrize("options", [{"constants": "adaptive", "momentum": 0.5}, {"constants": "data"}])
def test_state_dict_loaded_in_memory_shares_no_tensor_with_its_source(options):
    """``opt2.load_state_dict(opt1.state_dict())`` without a file: the copies train apart from the
    original. (Loading once aliased the adaptive multipliers, the momentum buffers and the followed
    norm bounds, so the two optimizers wrote into each other's state.)"""
    x, y = classification_data(64, 4, 3, seed=8)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model = mlp([4, 6, 6, 3], seed=8)
    opt = DSGD(model, **options)
    train(model, opt, 4)
    twin = mlp([4, 6, 6, 3], seed=8)
    twin.load_state_dict(model.state_dict())
    twin_opt = DSGD(twin, **options)
    twin_opt.load_state_dict(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    train(twin, twin_opt, 3)  # only the twin trains
    after = opt.state_dict()
    flat_before, flat_after = _tensors(before), _tensors(after)
    assert flat_before.keys() == flat_after.keys() and flat_before
    for key, value in flat_before.items():
        assert torch.equal(value, flat_after[key]), f"the source optimizer's {key} changed"
    train(model, opt, 3)  # and the source, trained alike, ends where the twin did
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def test_param_groups_are_named_after_their_layers_and_the_former_key_still_loads():
    """The group key is ``"name"`` (Lightning's LearningRateMonitor logs ``lr-DSGD/<layer>``); a state
    saved under the former key ``"layer_name"`` resumes identically, with and without the ``"dsgd"`` entry."""
    x, y = classification_data(32, 4, 3, seed=2)
    model = mlp([4, 6, 6, 3], seed=2)
    opt = DSGD(model, momentum=0.5, constants="data")
    assert [group["name"] for group in opt.param_groups] == opt.layer_names
    for _ in range(3):
        opt.step(make_closure(model, opt, x, y))
    state = copy.deepcopy(opt.state_dict())
    for group in state["param_groups"]:
        group["layer_name"] = group.pop("name")
    weights = copy.deepcopy(model.state_dict())
    for _ in range(3):
        opt.step(make_closure(model, opt, x, y))

    resumed_model = mlp([4, 6, 6, 3], seed=9)
    resumed_model.load_state_dict(weights)
    resumed = DSGD(resumed_model, momentum=0.5, constants="data")
    resumed.load_state_dict(state)
    assert all("layer_name" not in group for group in resumed.param_groups)
    assert [group["name"] for group in resumed.param_groups] == resumed.layer_names
    for _ in range(3):
        resumed.step(make_closure(resumed_model, resumed, x, y))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    torch_only = {k: v for k, v in state.items() if k != "dsgd"}
    DSGD(mlp([4, 6, 6, 3]), constants="data").load_state_dict(torch_only)


def test_load_state_dict_refuses_other_settings():
    model = mlp([4, 6, 3])
    state = DSGD(model, norm="linf").state_dict()
    with pytest.raises(ValueError, match="saved with norm='linf'"):
        DSGD(model, norm="spectral").load_state_dict(state)
    with pytest.raises(ValueError, match="not saved by DSGD"):
        DSGD(model).load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


# ---------------------------------------------------------------------------- efficiency contracts
def test_operator_norms_are_computed_only_for_layers_changed_from_outside(monkeypatch):
    """DSGD's own steps move the ``a_j`` by the triangle inequality (tests/test_norm_bounds.py);
    an SVD runs for a weight changed from outside, noticed through its version counter."""
    model = mlp([4, 6, 6, 6, 3], seed=0)
    x, y = classification_data(32, 4, 3)
    opt = DSGD(model, norm="spectral", constants="data")
    opt.constant_model.operator_norms.tolerance = float("inf")  # never refresh for growth here
    computed: list[int] = []
    original = opt.geometry.operator_norms
    monkeypatch.setattr(opt.geometry, "operator_norms", lambda ws: computed.append(len(ws)) or original(ws))
    closure = make_closure(model, opt, x, y)
    opt.step(closure)
    assert computed == [3]  # a_0 never enters a constant
    moved = set()
    for _ in range(8):
        computed.clear()
        moved.add(opt.last_step.layer)
        opt.step(closure)
        assert computed == []
    assert moved - {0}, "some layer above the first must have moved"
    # An outside in-place change is noticed: that a_j is recomputed, and the constants are those
    # of a fresh optimizer except where a moved layer's bound is (conservatively) larger.
    with torch.no_grad():
        model[6].weight.mul_(3.0)
    twin = copy.deepcopy(model)
    fresh = DSGD(twin, norm="spectral", constants="data")
    fresh.step(make_closure(twin, fresh, x, y))
    computed.clear()
    opt.step(closure)
    assert computed == [1]
    assert (opt.last_step.constants >= fresh.last_step.constants * (1 - 1e-12)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_parameters_are_scored_in_float32(dtype):
    model = mlp([4, 6, 3], seed=0, dtype=dtype)
    x, y = classification_data(16, 4, 3, dtype=dtype)
    opt = DSGD(model)
    before = snapshot(model)
    opt.step(make_closure(model, opt, x, y))
    rec = opt.last_step
    assert rec.scores.dtype == torch.float32 and rec.constants.dtype == torch.float32
    assert not rec.skipped and all(p.dtype == dtype for p in model.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_score_predicts_the_step_without_changing_anything():
    model = mlp([4, 6, 6, 3], seed=3)
    x, y = classification_data(32, 4, 3, seed=3)
    opt = DSGD(model, selection="random", constants="data")
    rng = opt._generator.get_state()
    opt.zero_grad()
    loss = full_batch_loss(model, x, y)
    opt.check_loss(loss)
    loss.backward()
    before = snapshot(model)
    predicted = opt.score()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert opt.steps_taken == 0 and opt.last_step is None and torch.equal(opt._generator.get_state(), rng)
    assert predicted.layer == int(predicted.scores.argmax()) and predicted.certified
    greedy = DSGD(model, constants="data")
    full_batch_loss(model, x, y)  # record input norms for the second optimizer's data constants
    greedy.step()
    torch.testing.assert_close(greedy.last_step.scores, predicted.scores)
    assert greedy.last_step.layer == predicted.layer


def test_zero_lr_step_is_a_no_op_and_torch_only_state_loads():
    """torch.distributed.checkpoint initialises optimizer state with a step at lr 0 and keeps only
    'state' and 'param_groups': neither may change DSGD's weights or counters."""
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model, selection="random")
    opt.step(make_closure(model, opt, x, y))
    before, counters = snapshot(model), (opt.steps_taken, list(opt.selection_counts))
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert opt.step() is None
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert (opt.steps_taken, opt.selection_counts) == counters
    for group in opt.param_groups:
        group["lr"] = 1.0
    torch_only = {k: v for k, v in opt.state_dict().items() if k != "dsgd"}
    fresh = DSGD(mlp([4, 6, 3], seed=0), selection="random")
    fresh.load_state_dict(torch_only)  # DSGD's own state is restored separately (the mixin's checkpoint entry)
    assert fresh.steps_taken == 0
    fresh.load_extra_state_dict(opt.extra_state_dict())
    assert fresh.steps_taken == 1 and torch.equal(fresh._generator.get_state(), opt._generator.get_state())
