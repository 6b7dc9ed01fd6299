"""Adaptive DSGD (the default): what its records declare, the trust region, the defaults; and the
certified algorithm's records, unchanged by the adaptive work (issue 13)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import classification_data, full_batch_loss, make_closure, mlp
from torch import nn

import lightning_dsgd.geometry as geometry_module
from lightning_dsgd import DSGD
from lightning_dsgd.geometry import augment

# (settings, per step: (layer, certified, loss, guaranteed decrease, constants)) of a certified run,
# computed on commit f3f6e69, before the adaptive rules and defaults of issue 13 changed.
CERTIFIED_REFERENCE = (
    (
        {"constants": "data"},
        [
            (2, True, 1.0976989479, 0.010010889749, [40.179802747, 10.397360978, 1.8399279507]),
            (2, True, 1.080421469303, 0.0053842466479, [40.029975489, 10.355104533, 1.8399279507]),
            (2, True, 1.070941718823, 0.003239188136, [40.467828293, 10.478651355, 1.8399279507]),
            (2, True, 1.065032361387, 0.0022969329129, [41.1997255, 10.685553967, 1.8399279507]),
            (2, True, 1.060689913038, 0.001869410342, [42.068651416, 10.931815561, 1.8399279507]),
            (2, True, 1.057082796373, 0.0016322065741, [43.023084361, 11.203078739, 1.8399279507]),
            (2, True, 1.053907589714, 0.0014642784249, [44.045285997, 11.494482025, 1.8399279507]),
            (2, True, 1.05105011449, 0.00132785146, [45.117836532, 11.801201679, 1.8399279507]),
            (2, True, 1.048454904421, 0.0012109238549, [46.22269112, 12.118174825, 1.8399279507]),
            (2, True, 1.046085787622, 0.0011087092148, [47.344375705, 12.4410139, 1.8399279507]),
            (2, True, 1.04391480292, 0.0010185635674, [48.470980022, 12.766304557, 1.8399279507]),
            (2, True, 1.041918803855, 0.00093863022963, [49.593841485, 13.091530944, 1.8399279507]),
        ],
    ),
    (
        {"constants": "architecture"},
        [
            (2, True, 1.0976989479, 0.0021669783365, [40.179802747, 15.901442044, 8.5]),
            (2, True, 1.093492336345, 0.0019206791848, [40.084678524, 15.86040794, 8.5]),
            (2, True, 1.08976234457, 0.0017053945701, [40.023247435, 15.833914864, 8.5]),
            (2, True, 1.086448712529, 0.0015176687657, [39.991827886, 15.820366746, 8.5]),
            (2, True, 1.083497944156, 0.0013543392817, [39.98731088, 15.818419124, 8.5]),
            (2, True, 1.080862721802, 0.0012125332241, [40.007014298, 15.826914959, 8.5]),
            (2, True, 1.078501331939, 0.0010896562887, [40.048573103, 15.844836301, 8.5]),
            (2, True, 1.076377115607, 0.0009833768114, [40.109861013, 15.871269782, 8.5]),
            (2, True, 1.074457952417, 0.00089160688574, [40.188938876, 15.905383793, 8.5]),
            (2, True, 1.072715783144, 0.00081248218395, [40.284024475, 15.946415009, 8.5]),
            (2, True, 1.071126172796, 0.00074434177553, [40.393478042, 15.993661802, 8.5]),
            (2, True, 1.069667913655, 0.00068570890605, [41.308155925, 16.389138351, 8.5]),
        ],
    ),
    (
        {"constants": "data", "selection": "cyclic"},
        [
            (0, True, 1.0976989479, 0.00010983300024, [40.179802747, 10.397360978, 1.8399279507]),
            (1, True, 1.097479413248, 0.0012312291835, [40.179802747, 10.399891523, 1.8386047043]),
            (2, True, 1.095035757443, 0.0095897177283, [41.167569676, 10.399891523, 1.8481548257]),
            (0, True, 1.078478432438, 0.00010990435007, [41.023174388, 10.360165091, 1.8481548257]),
            (1, True, 1.078258791909, 0.00089949532645, [41.023174388, 10.363646636, 1.8467503992]),
            (2, True, 1.076472032428, 0.0049798301991, [40.49775821, 10.363646636, 1.8593650211]),
            (0, True, 1.067688302362, 0.00011633126454, [40.951444221, 10.490242957, 1.8593650211]),
            (1, True, 1.067455862927, 0.00073646524475, [40.951444221, 10.494987271, 1.8578220271]),
            (2, True, 1.065991660922, 0.0029398856179, [41.720957757, 10.494987271, 1.8701577757]),
            (0, True, 1.060613611577, 0.00011874173786, [42.537065422, 10.718918671, 1.8701577757]),
            (1, True, 1.060376392391, 0.00065001643233, [42.537065422, 10.724636998, 1.8685719291]),
            (2, True, 1.0590832886, 0.0020709402575, [42.29816936, 10.724636998, 1.8799458626]),
        ],
    ),
)


def _certified_run(**settings) -> list[tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    opt = DSGD(model, **settings)
    out = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)  # the loss reaches DSGD, which reads its graph for the certificate
        r = opt.last_step
        out.append((r.layer, r.certified, loss.item(), r.guaranteed_decrease.item(), r.constants.tolist()))
    return out


@pytest.mark.parametrize("settings, reference", CERTIFIED_REFERENCE, ids=lambda v: str(v)[:40])
def test_certified_records_are_unchanged(settings, reference):
    for (layer, certified, loss, decrease, constants), (r_layer, r_certified, r_loss, r_decrease, r_constants) in zip(
        _certified_run(**settings), reference, strict=True
    ):
        assert (layer, certified) == (r_layer, r_certified) and certified
        assert loss == pytest.approx(r_loss, rel=1e-9, abs=1e-11)
        assert decrease == pytest.approx(r_decrease, rel=1e-8)
        assert constants == pytest.approx(r_constants, rel=1e-8)


def test_defaults_adaptive_every_layer_and_certified_one_argument_away():
    model = mlp([4, 6, 6, 3], seed=1)
    default = DSGD(model)
    assert default.constants_mode == "adaptive" and default.layers_per_step == 3 and not default.certified
    certified = DSGD(model, constants="data")
    assert certified.layers_per_step == 1 and certified.certified
    assert DSGD(model, constants="architecture").certified
    # One layer per step wherever a layer is chosen (random / cyclic), or asked for.
    assert DSGD(model, selection="cyclic").layers_per_step == 1
    assert DSGD(model, layers_per_step=1).layers_per_step == 1
    x, y = classification_data(32, 4, 3, seed=1)
    default.step(make_closure(model, default, x, y))
    assert default.last_step.layers == (0, 1, 2) and not default.last_step.certified


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_adaptive_full_batch_never_increases_the_loss_beyond_its_record(activation):
    """Full batch with ``undo_shortfalls``: every kept step decreased the loss by at least the
    decrease its record promised, and a step that did not is undone and recorded as skipped (the
    weights, hence the loss, restored). On the rigorous class and outside it."""
    torch.manual_seed(3)
    if activation == "tanh":
        model = mlp([5, 12, 12, 3], seed=3)
    else:
        model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    x, y = classification_data(48, 5, 3, seed=3)
    opt = DSGD(model, full_batch=True, undo_shortfalls=True)
    assert opt.constants_mode == "adaptive" and opt.layers_per_step == 3
    previous = None  # (loss before the step, its record)
    first = full_batch_loss(model, x, y).item()
    undone = 0
    for _ in range(40):
        opt.zero_grad()
        loss = full_batch_loss(model, x, y)
        loss.backward()
        opt.step(loss=loss)
        record = opt.last_step
        if previous is not None:
            before, promised = previous
            realized = before - loss.item()
            assert record.realized_decrease.item() == pytest.approx(realized, abs=1e-12)
            if record.skipped:  # the previous step fell short: undone, and said so
                undone += 1
                assert "undid the previous step" in record.skip_reason
                assert realized < promised.guaranteed_decrease.item()
                assert full_batch_loss(model, x, y).item() == pytest.approx(before, rel=1e-12, abs=1e-14)
            else:
                assert realized >= promised.guaranteed_decrease.item() * (1 - 1e-6) - 1e-7 * abs(before)
                assert realized >= 0.0
        previous = (loss.item(), record) if not record.skipped else None
    end = full_batch_loss(model, x, y).item()
    assert undone < 20 and end < 0.5 * first, (undone, first, end)


def test_trust_region_caps_a_step_from_a_constant_far_too_small():
    """Whatever the adaptive multipliers say, a step moves a layer by at most ``max_relative_step ·
    max(‖[W, b]‖, 1)`` in its own norm (here on a fresh optimizer, where the bound is exact)."""
    model = mlp([4, 8, 8, 3], seed=5)
    x, y = classification_data(32, 4, 3, seed=5)
    opt = DSGD(model)
    n = len(opt.layers)
    opt.constant_model.multipliers = torch.full((n,), 1e-9, dtype=torch.float64)
    opt.constant_model.floor = 1e-12

    def blocks() -> list[torch.Tensor]:
        return [
            augment(layer.weight_matrix(layer.weight.detach()), layer.bias.detach()).clone() for layer in opt.layers
        ]

    before = blocks()
    opt.step(make_closure(model, opt, x, y))
    for layer, old, new in zip(opt.layers, before, blocks(), strict=True):
        geometry = opt.geometry_of(layer)
        moved, size = geometry.norm(new - old).item(), geometry.norm(old).item()
        assert 0 < moved <= 0.2 * max(size, 1.0) * (1 + 1e-9)
    assert opt.constant_model.max_relative_step == 0.2


@pytest.mark.parametrize("max_batch", [1, 16])  # the CPU's, a GPU's
@pytest.mark.parametrize("norm", ["spectral", "frobenius", "linf"])
def test_trust_region_exact_weight_norms_are_each_blocks_norm(norm, max_batch, monkeypatch):
    """The trust region measures same-shape blocks together (batched SVDs of at most ``MAX_BATCH``
    blocks): every value is the layer's own ``‖[W, b]‖`` bit for bit, in any order of the layers."""
    monkeypatch.setitem(geometry_module.MAX_BATCH, "cpu", max_batch)
    model = mlp([6, 10, 10, 10, 4], dtype=torch.float32)
    opt = DSGD(model, constants="adaptive", norm=norm)
    region = opt.constant_model.trust_region
    indices = [3, 1, 0, 2]
    params = [[p.detach() for p in opt.layers[i].params] for i in indices]
    batched = region._exact_weight_norms(indices, params)
    for k, i in enumerate(indices):
        layer = opt.layers[i]
        single = opt.geometry_of(layer).norm(augment(layer.weight.detach(), layer.bias.detach()))
        assert torch.equal(batched[k], single), i
    if norm == "spectral":
        blocks = [augment(opt.layers[i].weight.detach(), opt.layers[i].bias.detach()).double() for i in indices]
        expected = torch.stack([torch.linalg.svdvals(b)[0] for b in blocks])
        torch.testing.assert_close(batched.double(), expected, rtol=1e-5, atol=0)


def test_every_layer_matmul_path_resumes_bit_identically():
    """Every layer moves along its matmul-path direction, its step held in contiguous parts; the
    checkpoint holds each pending step as its block, and the resumed run continues with the same bits."""

    def build() -> nn.Module:
        torch.manual_seed(4)
        return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3))

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)

    def train(model: nn.Module, opt: DSGD, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def optimizer(model: nn.Module) -> DSGD:
        opt = DSGD(model)
        opt.geometries["spectral"].polar = "always"  # type: ignore[attr-defined]
        return opt

    model, resumed_model = build(), build()
    opt = optimizer(model)
    train(model, opt, 3)
    pending = opt.constant_model.pending
    assert pending and all(isinstance(p.step, tuple) for p in pending.values())
    state = copy.deepcopy(opt.state_dict())
    saved = state["dsgd"]["constant_model"]["adaptive"]["pending"]
    assert {i: list(p["step"].shape) for i, p in saved.items()} == dict(enumerate(opt._layer_shapes()))
    resumed_model.load_state_dict(model.state_dict())
    resumed = optimizer(resumed_model)
    resumed.load_state_dict(state)
    train(model, opt, 3)
    train(resumed_model, resumed, 3)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
