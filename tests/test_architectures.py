"""DSGD on the models users have (docs/theory.md, "The rigorous class", outside the rigorous class): every layer type
gets a block, a norm and finite constants; overrides; real architectures train with defaults;
adaptive constants and the options for large models."""

from __future__ import annotations

import pytest
import torch
from helpers.architectures import (
    ReluCNN,
    ResidualMLP,
    TinyTransformer,
    image_task,
    sequence_task,
    vector_task,
)
from helpers.models import classification_data, full_batch_loss, make_closure, mlp
from torch import nn

from lightning_dsgd import DSGD, LossBounds
from lightning_dsgd.layers import discover_layers


class Zoo(nn.Module):
    """One of every supported kind (shapes only matter for discovery)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.conv1 = nn.Conv1d(2, 3, 3)
        self.conv2 = nn.Conv2d(2, 3, (3, 2), bias=False)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.embedding = nn.Embedding(7, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.batch_norm = nn.BatchNorm1d(4)
        self.group_norm = nn.GroupNorm(2, 4)
        self.rms_norm = nn.RMSNorm(4)
        self.attention = nn.MultiheadAttention(4, 2)
        self.cross = nn.MultiheadAttention(4, 2, kdim=3, vdim=5)
        self.scale = nn.Parameter(torch.ones(4))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_every_layer_type_gets_a_block_and_a_norm():
    layers = {layer.name: layer for layer in discover_layers(Zoo(), "spectral")}
    expected = {
        "linear": ("linear", "spectral", (3, 4), True),
        "conv1": ("conv", "spectral", (3, 6), True),
        "conv2": ("conv", "spectral", (3, 12), False),
        "conv3": ("conv", "spectral", (2, 8), True),
        "embedding": ("embedding", "rows", (7, 4), False),
        "layer_norm": ("norm", "linf", (4, 1), True),
        "batch_norm": ("norm", "linf", (4, 1), True),
        "group_norm": ("norm", "linf", (4, 1), True),
        "rms_norm": ("norm", "linf", (4, 1), False),
        "attention.q": ("attention", "spectral", (4, 4), True),
        "attention.k": ("attention", "spectral", (4, 4), True),
        "attention.v": ("attention", "spectral", (4, 4), True),
        "attention.out_proj": ("linear", "spectral", (4, 4), True),
        "cross.q": ("attention", "spectral", (4, 4), True),
        "cross.k": ("attention", "spectral", (4, 3), True),
        "cross.v": ("attention", "spectral", (4, 5), True),
        "cross.out_proj": ("linear", "spectral", (4, 4), True),
        "Zoo.scale": ("parameter", "spectral", (4, 1), False),
    }
    assert set(layers) == set(expected)  # the frozen Linear is ignored
    for name, (kind, norm, shape, has_bias) in expected.items():
        layer = layers[name]
        assert (layer.kind, layer.norm, tuple(layer.weight_matrix(layer.weight).shape)) == (kind, norm, shape), name
        assert (layer.bias is not None) == has_bias, name


def test_overrides_by_name_pattern():
    zoo = Zoo()
    layers = {
        x.name: x
        for x in discover_layers(
            zoo,
            "spectral",
            {
                "conv*": {"norm": "frobenius"},
                "linear": {"grouping": "parameter"},
                "attention": {"grouping": "fused"},
                "embedding": {"norm": "spectral"},
            },
        )
    }
    assert {layers[n].norm for n in ("conv1", "conv2", "conv3")} == {"frobenius"}
    assert layers["linear.weight"].bias is None and layers["linear.bias"].weight is zoo.linear.bias
    assert "attention.in_proj" in layers and "attention.q" not in layers
    assert layers["embedding"].norm == "spectral"
    with pytest.raises(ValueError, match="is not valid; use keys 'norm'"):
        discover_layers(zoo, "spectral", {"linear": {"grouping": "rows"}})
    with pytest.raises(ValueError, match="Unknown norm 'l1'"):
        DSGD(zoo, overrides={"linear": {"norm": "l1"}})


def test_fused_attention_blocks_update_their_own_rows():
    mha = nn.MultiheadAttention(4, 2)
    opt = DSGD(mha, norm="frobenius", loss="mse", layers_per_step=1)
    assert opt.layer_names == ["q", "k", "v", "out_proj"] or opt.layer_names[:3] == [
        f"{type(mha).__name__}.{p}" for p in "qkv"
    ]
    x = torch.randn(5, 3, 4)
    before = mha.in_proj_weight.detach().clone()
    opt.zero_grad()
    mha(x, x, x)[0].square().mean().backward()
    opt.step()
    chosen = opt.last_step.layer
    changed = (mha.in_proj_weight.detach() != before).any(dim=1)
    if chosen < 3:  # exactly the chosen projection's rows moved
        assert changed.tolist() == [chosen * 4 <= r < chosen * 4 + 4 for r in range(12)]
    else:
        assert not changed.any()


def test_attention_blocks_state_the_argument_they_multiply():
    """q, k and v read the query, key and value (declared, not inferred from the name); the input norms
    follow: a key of another scale changes the recorded norm of k only."""
    from lightning_dsgd.input_norms import InputNormRecorder

    for grouping, expected in (("module", [(0, "query"), (1, "key"), (2, "value")]), ("fused", [(0, "query")])):
        layers = discover_layers(nn.MultiheadAttention(4, 2), "spectral", {"*": {"grouping": grouping}})
        assert [layer.argument for layer in layers if layer.kind == "attention"] == expected
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    recorder = InputNormRecorder(discover_layers(attention, "spectral"), "l2")
    q = torch.ones(2, 3, 4)
    attention(q, 5 * q, q)
    norms = [float(m) for m, layer in zip(recorder.maxima, recorder.layers, strict=True) if layer.kind == "attention"]
    assert norms[1] > 4 * norms[0] and norms[0] == pytest.approx(norms[2])


def test_find_chain_returns_the_chain_or_the_reason():
    from lightning_dsgd.chain import find_chain

    model = mlp([4, 6, 3])
    layers = discover_layers(model, "spectral")
    chain, reason = find_chain(model, layers)
    assert chain is not None and reason is None and chain.layers == layers
    assert find_chain(model, layers, loss_certified=False) == (None, "the loss is not certified")
    assert find_chain(model, layers, norm="rows") == (None, "norm='rows'")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    chain, reason = find_chain(conv, discover_layers(conv, "spectral"))
    assert chain is None and "is not a whole nn.Linear block" in reason


@pytest.mark.parametrize(
    ("make", "task"),
    [(ReluCNN, image_task), (ResidualMLP, vector_task), (TinyTransformer, sequence_task)],
    ids=["relu-cnn", "residual", "transformer"],
)
def test_real_architectures_train_with_defaults(make, task):
    torch.manual_seed(0)
    model = make()
    x, y = task()
    opt = DSGD(model)

    def closure():
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        return loss

    first = opt.step(closure).item()
    losses = [opt.step(closure).item() for _ in range(150)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max(losses) < 2 * first  # no divergence
    assert min(losses[-10:]) < 0.6 * first  # a clearly lower loss
    assert not opt.certified and not opt.last_step.certified
    assert torch.isfinite(opt.last_step.constants).all()
    assert sum(1 for c in opt.selection_counts if c > 0) >= 2  # more than one layer was trained


def test_constants_of_every_kind_are_finite_and_positive():
    torch.manual_seed(0)
    model = TinyTransformer()
    x, y = sequence_task()
    opt = DSGD(model)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).reshape(-1, 12), y.reshape(-1)).backward()
    record = opt.score()
    assert len(record.constants) == len(opt.layers)
    assert torch.isfinite(record.constants).all() and (record.constants > 0).all()
    assert torch.isfinite(record.scores).all()


# ---------------------------------------------------------------------------- rigorous models
def test_rigorous_models_stay_certified_and_adaptive_never_exceeds_the_certificate():
    model = mlp([6, 10, 8, 4], seed=4)
    x, y = classification_data(128, 6, 4, seed=4)
    certified, adaptive_model = DSGD(model, constants="data"), mlp([6, 10, 8, 4], seed=4)
    adaptive = DSGD(adaptive_model, constants="adaptive")
    assert certified.certified and not adaptive.certified
    for _ in range(30):
        adaptive.step(make_closure(adaptive_model, adaptive, x, y))
        multipliers = adaptive.constant_model.multipliers
        assert (multipliers <= 1.0).all()  # never above the certified constant
    assert (adaptive.constant_model.multipliers < 1.0).any()


def test_full_batch_undo_keeps_only_steps_that_kept_their_promise():
    """With a deliberately optimistic start (multipliers at the floor) the first steps overshoot;
    every step that is kept must have decreased the loss by at least its promise."""
    model = mlp([6, 16, 16, 4], seed=5, weight_scale=2.0)
    x, y = classification_data(128, 6, 4, seed=5, scale=2.0)
    opt = DSGD(model, constants="adaptive", full_batch=True, undo_shortfalls=True, adaptive_options={"floor": 1e-3})
    closure = make_closure(model, opt, x, y)
    opt.step(closure)
    opt.constant_model.multipliers.fill_(1e-3)
    undone, kept = 0, 0
    previous, loss_before_previous = opt.last_step, None
    for _ in range(60):
        loss_before = full_batch_loss(model, x, y).item()
        opt.step(closure)
        record = opt.last_step
        if record.skipped:
            undone += 1
            assert "undid the previous step" in record.skip_reason
            assert full_batch_loss(model, x, y).item() == pytest.approx(loss_before_previous, rel=1e-12)
        elif previous is not None and not previous.skipped and record.realized_decrease is not None:
            kept += 1
            assert record.realized_decrease.item() >= previous.guaranteed_decrease.item() * (1 - 1e-6) - 1e-7
        loss_before_previous = loss_before
        previous = record
    assert undone >= 1 and kept >= 10


def test_full_batch_records_the_realized_decrease_beside_the_promise():
    model = mlp([5, 8, 3], seed=1)
    x, y = classification_data(64, 5, 3, seed=1)
    opt = DSGD(model, full_batch=True)
    closure = make_closure(model, opt, x, y)
    losses = [opt.step(closure).item()]
    promises = [opt.last_step.guaranteed_decrease.item()]
    for _ in range(5):
        losses.append(opt.step(closure).item())
        assert opt.last_step.realized_decrease.item() == pytest.approx(losses[-2] - losses[-1], rel=1e-6)
        assert opt.last_step.realized_decrease.item() >= promises[-1] * (1 - 1e-5)
        promises.append(opt.last_step.guaranteed_decrease.item())


# ---------------------------------------------------------------------------- options for large models
def test_layers_per_step_and_momentum():
    x, y = classification_data(64, 5, 3, seed=2)
    model = mlp([5, 8, 8, 3], seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = DSGD(model, layers_per_step="all")
    opt.step(make_closure(model, opt, x, y))
    assert opt.last_step.layers == (0, 1, 2) and not opt.last_step.certified
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    momentum_model = mlp([5, 8, 8, 3], seed=2)
    momentum = DSGD(momentum_model, momentum=0.9)
    closure = make_closure(momentum_model, momentum, x, y)
    losses = [momentum.step(closure).item() for _ in range(30)]
    assert losses[-1] < losses[0] and not momentum.last_step.certified
    with pytest.raises(ValueError, match="momentum must be in"):
        DSGD(mlp([3, 4, 2]), momentum=1.0)
    with pytest.raises(ValueError, match="needs selection='greedy'"):
        DSGD(mlp([3, 4, 2]), layers_per_step=2, selection="cyclic")
    with pytest.raises(ValueError, match="undo_shortfalls needs full_batch=True"):
        DSGD(mlp([3, 4, 2]), undo_shortfalls=True)


def test_top_k_moves_the_k_best_layers():
    x, y = classification_data(64, 5, 3, seed=2)
    model = mlp([5, 8, 8, 3], seed=2)
    opt = DSGD(model, layers_per_step=2)
    opt.step(make_closure(model, opt, x, y))
    scores = opt.last_step.scores
    assert opt.last_step.layers == tuple(sorted(torch.topk(scores, 2).indices.tolist()))


def test_losses_outside_cross_entropy():
    model = mlp([4, 6, 2], seed=0)
    x = torch.randn(16, 4, dtype=torch.float64)
    target = torch.randn(16, 2, dtype=torch.float64)
    opt = DSGD(model, loss="mse")
    opt.zero_grad()
    nn.functional.mse_loss(model(x), target).backward()
    opt.step()
    assert not opt.last_step.certified and opt.not_rigorous_reason == "the loss is not certified"
    mine = LossBounds("my_bounded_loss", g_l2=1.0, h_l2=0.25, g_linf=1.0, h_linf=0.25, certified=True)
    assert DSGD(model, loss=mine, constants="data").certified
