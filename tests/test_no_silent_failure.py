"""Issue 11 in plain PyTorch: zero-initialised layers train, a wrong or unknown loss is not certified,
one bad batch cannot poison architecture mode, ranks take rank 0's decision, and every bad argument
or state gets a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.models import classification_data, full_batch_loss, make_closure, mlp
from torch import nn

from lightning_dsgd import DSGD


def zero_(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


# ---------------------------------------------------------------------- item 4: zero-initialised layers
@pytest.mark.parametrize("norm", ["spectral", "frobenius", "linf"])
@pytest.mark.parametrize("mode", ["data", "architecture", "adaptive"])
@pytest.mark.parametrize("zeroed", [4, 2])  # the output head, a hidden layer
def test_a_zero_initialised_layer_trains_and_the_layers_below_follow(norm, mode, zeroed):
    model = mlp([5, 7, 6, 3], seed=1)
    zero_(model[zeroed])
    x, y = classification_data(40, 5, 3, seed=1)
    opt = DSGD(model, norm=norm, constants=mode)
    below = [i for i, layer in enumerate(opt.layers) if layer.module is not model[zeroed]][: zeroed // 2]
    initial = [layer.weight.detach().clone() for layer in opt.layers]
    losses = []
    for _ in range(30):
        losses.append(opt.step(make_closure(model, opt, x, y)).item())
        rec = opt.last_step
        assert not rec.skipped, rec.skip_reason
        assert torch.isfinite(rec.scores).all() and (rec.scores >= 0).all()
        assert rec.certified == (mode != "adaptive")
    assert opt.selection_counts[zeroed // 2] > 0  # the zero layer moved
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if zeroed == 4:  # the layers below a zero head have g = 0 first, then train once the head moved
        moved = [i for i in below if opt.selection_counts[i] > 0]
        assert moved and all(not torch.equal(initial[i], opt.layers[i].weight) for i in moved)


def test_zero_gradient_layers_score_zero_not_nan():
    model = mlp([4, 5, 3], seed=0)
    zero_(model[2])
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model)
    opt.step(make_closure(model, opt, x, y))
    rec = opt.last_step
    assert rec.scores[0].item() == 0.0 and rec.constants[0].item() == 0.0 and rec.layer == 1


@pytest.mark.parametrize("selection", ["cyclic", "random"])
def test_cyclic_and_random_choices_of_a_zero_gradient_layer_never_write_nan(selection):
    model = mlp([4, 5, 3], seed=0)
    zero_(model[2])
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model, selection=selection)
    for _ in range(6):
        opt.step(make_closure(model, opt, x, y))
        assert not opt.last_step.skipped
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adaptive_constants_never_give_an_infinite_step():
    model = mlp([4, 5, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model, constants="adaptive", adaptive_options={"floor": 1e-300, "safety": 1e-300})
    for _ in range(10):
        opt.step(make_closure(model, opt, x, y))
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_skip_names_the_real_layer_and_cause():
    model = mlp([4, 5, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    opt.step(make_closure(model, opt, x, y))
    assert opt.last_step.skipped and "non-finite gradient (inf/NaN) in layer(s)" in opt.last_step.skip_reason


def test_the_loss_check_does_not_depend_on_the_dtype_at_construction():
    """Built on bfloat16 parameters (not certified then), trained in float32: the loss is still checked."""
    model = mlp([4, 6, 3], seed=0).to(torch.bfloat16)
    opt = DSGD(model, constants="data")
    model.float()
    x, y = classification_data(16, 4, 3, dtype=torch.float32)
    loss = nn.functional.mse_loss(model(x), nn.functional.one_hot(y, 3).float())
    loss.backward()
    opt.step(loss=loss)
    assert not opt.last_step.certified and "MseLossBackward0" in opt.last_step.not_certified_reason
    opt.zero_grad()
    opt.step(make_closure(model, opt, x, y))
    assert opt.last_step.certified


def test_adaptive_options_with_certified_constants_are_refused():
    with pytest.raises(ValueError, match="are certified and fixed"):
        DSGD(mlp([4, 6, 3], seed=0), constants="data", adaptive_options={"max_relative_step": 1e-6})


def test_the_trust_region_bounds_steps_along_the_velocity():
    """With momentum the step follows the velocity, up to 1/(1 − μ) longer than η‖g‖*/L: the
    adaptive trust region must bound that step too (to its radius, from a bound within 25% of ‖W‖)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = DSGD(model, momentum=0.9, norm="frobenius", adaptive_options={"max_relative_step": 0.1})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    worst = 0.0
    for _ in range(40):
        i = torch.randint(0, 256, (32,), generator=g)
        blocks = [m for m in model if isinstance(m, nn.Linear)]
        before = [torch.cat([m.weight.detach().flatten(), m.bias.detach()]).clone() for m in blocks]
        opt.step(make_closure(model, opt, x[i], y[i]))
        for m, b in zip(blocks, before, strict=True):
            a = torch.cat([m.weight.detach().flatten(), m.bias.detach()])
            worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1.0)))
    assert worst <= 0.1 * 1.25 + 1e-6, worst


def test_a_nonfinite_weight_is_a_skip_in_every_constants_mode():
    """The adaptive trust region measures ‖W‖ exactly: a NaN weight must give a skip, not a LAPACK error."""
    for constants in ("data", "architecture", "adaptive"):
        model = mlp([4, 5, 3], seed=0)
        x, y = classification_data(16, 4, 3)
        opt = DSGD(model, constants=constants)
        with torch.no_grad():
            model[2].weight[0, 0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(make_closure(model, opt, x, y))
        assert opt.last_step.skipped, constants
        for p, q in zip(model.parameters(), before, strict=True):
            assert torch.equal(torch.nan_to_num(p, nan=7.0), torch.nan_to_num(q, nan=7.0)), constants


# ---------------------------------------------------------------------- item 5: the certificate
def test_the_certificate_needs_the_mean_cross_entropy_of_the_chain():
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model, constants="data")

    def run(loss_fn):
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x))
            loss.backward()
            return loss

        opt.step(closure)
        return opt.last_step

    onehot = nn.functional.one_hot(y, 3).to(x.dtype)
    assert run(lambda z: nn.functional.cross_entropy(z, y)).certified
    for loss_fn, reason in [
        (lambda z: nn.functional.mse_loss(z, onehot), "MseLossBackward0"),
        (lambda z: nn.functional.cross_entropy(z, y, reduction="sum"), "unweighted mean"),
        (lambda z: nn.functional.cross_entropy(2 * z, y), "not of the chain's last layer's output"),
        (lambda z: nn.functional.cross_entropy(z, y, label_smoothing=0.1), "AddBackward0"),
    ]:
        rec = run(loss_fn)
        assert not rec.certified and not rec.skipped and reason in rec.not_certified_reason
    # outside the proved class although the graph ends in NLL(log_softmax(chain output))
    y_batch = torch.randint(0, 16, (3,))
    for loss_fn, reason in [
        (lambda z: nn.functional.nll_loss(nn.functional.log_softmax(z, dim=0), y), "not taken over the classes"),
        (lambda z: nn.functional.cross_entropy(z.T, y_batch), "not of the chain's last layer's output"),
        (lambda z: nn.functional.cross_entropy(z.bfloat16(), y), "below float32"),
        (lambda z: nn.functional.cross_entropy(z.half().float(), y), "not of the chain's last layer's output"),
    ]:
        rec = run(loss_fn)
        assert not rec.certified and reason in rec.not_certified_reason
    assert run(lambda z: nn.functional.cross_entropy(z.view(16, 3), y)).certified  # a view changes nothing
    # no loss handed to step: nothing to check, so no certificate
    opt.zero_grad()
    full_batch_loss(model, x, y).backward()
    opt.step()
    assert not opt.last_step.certified and "no loss with its autograd graph" in opt.last_step.not_certified_reason
    loss = full_batch_loss(model, x, y)
    opt.check_loss(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert opt.last_step.certified and opt.last_step.not_certified_reason is None


# ---------------------------------------------------------------------- item 6: architecture mode
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_one_bad_batch_does_not_poison_architecture_mode(bad):
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model, constants="architecture", selection="cyclic")
    poisoned = x.clone()
    poisoned[3, 1] = bad
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(make_closure(model, opt, poisoned, y))
    if bad != 1e30:
        assert opt.last_step.skipped and "non-finite" in opt.last_step.skip_reason
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    state = opt.state_dict()
    flat = [v for v in state["dsgd"]["constant_model"].values() if isinstance(v, torch.Tensor)]
    assert all(torch.isfinite(v).all() for v in flat)
    for _ in range(4):  # later clean batches train every layer again (layer 0 included)
        w0 = model[0].weight.detach().clone()
        opt.step(make_closure(model, opt, x, y))
        rec = opt.last_step
        assert not rec.skipped and rec.certified and torch.isfinite(rec.constants).all()
        if rec.layer == 0:
            assert (model[0].weight - w0).abs().max() > 1e-6


def test_a_batch_above_the_declared_data_bound_keeps_the_certificate_true():
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3, scale=5.0)
    small = DSGD(model, constants="architecture", data_bound=1.0)
    small.step(make_closure(model, small, x, y))
    exact = DSGD(model, constants="architecture", data_bound=float(x.norm(dim=1).max()))
    exact.step(make_closure(model, exact, x, y))
    assert torch.all(small.last_step.constants >= exact.last_step.constants * (1 - 1e-9))


# ---------------------------------------------------------------------- item 8: ranks
def fake_ranks(*others):
    """A gatherer as if other ranks had produced ``others`` (functions of this rank's row)."""

    def gather(row):
        return torch.stack([row, *(f(row) for f in others)])

    return gather


def test_every_rank_takes_rank_zeros_random_choice():
    model = mlp([4, 6, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    rank0, rank1 = DSGD(model, selection="random", seed=0), DSGD(mlp([4, 6, 6, 3], seed=0), selection="random", seed=1)
    model1 = rank1._model
    choices = []
    for _ in range(8):
        rank0.step(make_closure(model, rank0, x, y))
        planned = float(rank0.last_step.layer)
        rank1.gather = fake_ranks()  # placeholder; rank 0's row is injected below

        def as_rank1(row, planned=planned):
            rank0_row = row.clone()
            rank0_row[3] = planned
            return torch.stack([rank0_row, row])

        rank1.gather = as_rank1
        rank1.step(make_closure(model1, rank1, x, y))
        choices.append((rank0.last_step.layer, rank1.last_step.layer))
    assert all(a == b for a, b in choices)
    for p, q in zip(model.parameters(), model1.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_a_rank_with_other_gradients_fails_loudly():
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)

    def other(row):
        out = row.clone()
        out[0] = 1 - row[0]
        return out

    opt = DSGD(model, gather=fake_ranks(other))
    with pytest.raises(RuntimeError, match="DSGD ranks disagree at step 0: rank 1 scores layer"):
        opt.step(make_closure(model, opt, x, y))


# ---------------------------------------------------------------------- item 11: clear errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers_per_step": "two"}, ValueError, "layers_per_step must be an int ≥ 1, 'all', or None"),
        ({"layers_per_step": 2.5}, ValueError, "layers_per_step must be an int ≥ 1, 'all', or None"),
        ({"layers_per_step": True}, ValueError, "layers_per_step must be an int ≥ 1, 'all', or None"),
        ({"constants": "architecture", "data_bound": "3"}, TypeError, "data_bound must be a real number"),
        ({"constants": "architecture", "data_bound": 0}, ValueError, "data_bound must be a finite number > 0"),
        ({"seed": "a"}, TypeError, "seed must be an int"),
        ({"overrides": ["0"]}, TypeError, "overrides must map module-name patterns to settings"),
        ({"eta": True}, TypeError, "eta must be a real number"),
        ({"adaptive_options": {"floor": -1}}, ValueError, r"adaptive_options\['floor'\] must be a number"),
        ({"adaptive_options": {"flor": 1}}, ValueError, r"Unknown adaptive_options \['flor'\]"),
        ({"momentum": "0.5"}, TypeError, "momentum must be a real number"),
        ({"full_batch": 1}, TypeError, "full_batch must be True or False"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DSGD(mlp([4, 6, 3]), **kwargs)


@pytest.mark.parametrize("eta", [np.float32(0.5), torch.tensor(0.5), 1])
def test_numbers_of_every_kind_are_accepted_as_eta(eta):
    opt = DSGD(mlp([4, 6, 3]), eta=eta)
    assert opt.param_groups[0]["lr"] == float(eta)


def test_a_replaced_layer_is_named():
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model)
    model[2] = nn.Linear(6, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"DSGD's layer\(s\) \['2'\] are no longer part of the model"):
        opt.step(make_closure(model, opt, x, y))


def test_state_of_another_width_is_refused_at_load():
    x, y = classification_data(16, 4, 3)
    for mode in ("adaptive", "data"):
        narrow = mlp([4, 6, 3], seed=0)
        opt = DSGD(narrow, constants=mode)
        opt.step(make_closure(narrow, opt, x, y))
        state = opt.state_dict()
        wide = mlp([4, 9, 3], seed=0)
        with pytest.raises(ValueError, match="layer_shapes"):
            DSGD(wide, constants=mode).load_state_dict(state)
        state["dsgd"].pop("layer_shapes")  # a state saved before shapes were recorded
        if mode == "adaptive":
            with pytest.raises(ValueError, match="The adaptive constants' state was saved for another model"):
                DSGD(wide, constants=mode).load_state_dict(state)


def test_an_empty_batch_is_named():
    model = mlp([4, 6, 3], seed=0)
    opt = DSGD(model)
    with pytest.raises(ValueError, match="received an empty input"):
        model(torch.zeros(0, 4, dtype=torch.float64))
    opt.remove_hooks()


def test_a_chain_naming_a_module_outside_the_model_says_so():
    model = mlp([4, 6, 3], seed=0)
    with pytest.raises(ValueError, match="is not a module of the model"):
        DSGD(model, chain=[model[0], nn.Tanh(), nn.Linear(6, 3)])


def test_the_module_pickles_after_remove_hooks():
    import pickle

    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    opt = DSGD(model)
    opt.step(make_closure(model, opt, x, y))
    opt.remove_hooks()
    pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("selection", ["greedy", "cyclic", "random"])
def test_no_gradient_at_all_is_a_skip_for_every_selection(selection):
    model = mlp([4, 6, 3], seed=0)
    x, _ = classification_data(16, 4, 3)
    opt = DSGD(model, selection=selection)
    model(x)  # a forward, but no backward
    opt.step()
    assert opt.last_step.skipped and "gradient is zero or missing" in opt.last_step.skip_reason


def test_check_loss_through_fabrics_optimizer_wrapper_reaches_the_step():
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model = mlp([4, 6, 3], seed=0)
    x, y = classification_data(16, 4, 3)
    model, opt = fabric.setup(model, DSGD(model, constants="data"))
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.check_loss(loss)
        fabric.backward(loss)
        opt.step()
        assert opt.last_step.certified, opt.last_step.not_certified_reason
