"""Work shared across ranks (``share_work``, lightning_dsgd/plan.py): the cost-balanced split, and
real 2-process DDP and FSDP2 runs (gloo) where each rank scores only its own layers, FSDP2 ranks
gather only those layers' full gradients, every rank chooses alike and the records equal a
single-process run on the same global batch."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers.lightning_models import Classifier
from test_distributed import launch, results
from torch import nn

from lightning_dsgd import DSGD, DSGDSettings
from lightning_dsgd.plan import _shard_rows, balanced_owners, layer_cost, norm_owners, rounds


def test_the_split_is_longest_processing_time_first_and_deterministic():
    costs = [5, 9, 2, 7, 4, 4]
    owners = balanced_owners(costs, 2)
    assert owners == balanced_owners(list(costs), 2)  # the same on every rank
    # LPT: 9 → 0, 7 → 1, 5 → 1, 4 → 0, 4 → 1, 2 → 0: loads 15 and 16.
    assert owners == (1, 0, 0, 1, 0, 1)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert max(loads) - min(loads) <= max(costs)
    assert balanced_owners([3, 3, 3], 4) == (0, 1, 2)  # more ranks than layers: one each, some idle
    assert balanced_owners(costs, 1) == (0,) * len(costs)


def test_due_norms_go_to_the_least_loaded_rank_costliest_first():
    # Rank 0 scores 10, rank 1 scores 4: 6 → 1 (4 → 10), 5 → 0 (10 → 15), 3 → 1 (10 → 13), 3 → 1 (13 → 16).
    assert norm_owners([3, 6, 5, 3], [10, 4]) == (1, 1, 0, 1)
    assert norm_owners([3, 6, 5, 3], [10, 4]) == norm_owners([3, 6, 5, 3], (10, 4))  # the same on every rank
    assert norm_owners([], [1, 2]) == ()
    assert norm_owners([7, 7], [0, 0, 0]) == (0, 1)  # ties: the lower rank


def test_rounds_put_each_ranks_kth_item_side_by_side():
    """Gathers issued round by round: round r holds every rank's r-th item, so no rank waits at a
    collective for another rank's earlier items (in index order rank 1 would wait for 0, 1, 2 here)."""
    assert list(rounds([0, 0, 0, 1, 1], 2)) == [[0, 3], [1, 4], [2]]
    assert list(rounds([1, 0, 2, 0], 3)) == [[1, 0, 2], [3]]
    assert list(rounds([], 2)) == []
    assert sorted(k for batch in rounds([1, 1, 0, 1, 0], 2) for k in batch) == list(range(5))  # each item once


def test_spectral_blocks_cost_an_svd_others_a_pass():
    assert layer_cost(64, 33, "spectral") == 64 * 33 * 33
    assert layer_cost(64, 33, "frobenius") == layer_cost(64, 33, "linf") == 64 * 33


@pytest.mark.parametrize("rows", [1, 3, 7, 8, 9])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_rows_are_the_chunks_shard0_places(rows, world):
    chunks = torch.arange(rows).chunk(world)
    expected = [len(c) for c in chunks] + [0] * (world - len(chunks))
    assert [_shard_rows(rows, world, r) for r in range(world)] == expected
    assert sum(expected) == rows and max(expected) == math.ceil(rows / world)


def test_one_process_never_splits_and_steps_as_before():
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    runs = []
    for share in (None, False, True):
        model = Classifier(seed=1)
        opt = DSGD(model, constants="data", share_work=share)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert not opt.work_plan.shared and opt.work_plan.owners == (0, 0, 0)
        assert opt.work_plan.layers_scored == 3
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_share_work_is_checked_at_construction():
    with pytest.raises(TypeError, match="share_work must be True, False or None"):
        DSGDSettings(share_work="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum > 0 keeps a velocity per layer"):
        DSGD(Classifier(), momentum=0.5, share_work=True)
    assert DSGD(Classifier(), momentum=0.5, gather=lambda t: t[None]).work_plan.shared is False


def _work(out) -> tuple[dict, dict]:
    return torch.load(out / "work0.pt", weights_only=False), torch.load(out / "work1.pt", weights_only=False)


def _reference_records(settings: DSGDSettings, steps: int, hidden: int) -> list:
    """The single-process run on the same global batches (as ``test_mixin.reference_run``)."""
    module = Classifier(hidden=hidden)
    opt = DSGD(module, **settings.optimizer_kwargs())
    batches, records = list(module.train_dataloader()), []
    for t in range(steps):
        x, y = batches[t % len(batches)]
        nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
        opt.zero_grad()
        records.append(opt.last_step)
    return records


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "constants", "hidden"),
    [("dsgd_ddp", "data", 8), ("model_parallel", "data", 8), ("model_parallel", "adaptive", 48)],
)
def test_each_rank_scores_its_own_layers_and_all_choose_alike(tmp_path, case, constants, hidden):
    steps = 8
    run = launch(case, tmp_path, "--constants", constants, "--steps", str(steps), "--hidden", str(hidden))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0, rank1 = results(tmp_path)
    work0, work1 = _work(tmp_path)
    assert work0["shared"] and work1["shared"] and work0["owners"] == work1["owners"]
    owners = work0["owners"]
    shapes = [(hidden, 7), (hidden, hidden + 1), (3, hidden + 1)]  # the [W, b] blocks of Classifier
    assert owners == balanced_owners([layer_cost(m, n, "spectral") for m, n in shapes], 2) == (1, 0, 1)
    sharded = case == "model_parallel"
    for rank, work in enumerate((work0, work1)):
        own = sum(1 for o in owners if o == rank)
        assert len(work["steps"]) == steps
        for t, step in enumerate(work["steps"]):
            assert step["scored"] == own  # only its own layers
            # FSDP2: only its own layers' full gradients, never every one of them (DDP gathers none);
            # one layer per step (certified): the moving layer's again for its step, by its owner.
            again = constants == "data" and owners[rank0["layers"][t]] == rank
            assert step["gathered"] == ((own + again) if sharded else 0)
            assert step["alive"] == (1 if sharded else 0)  # one full gradient at a time
            assert (step["bytes"] > 0) == sharded
            # Adaptive: every layer moved; under FSDP2 each owner alone keeps its steps' blocks.
            kept = step["kept"]
            assert (kept > 0) == (constants == "adaptive")
            assert kept < work["full_gradient_bytes"] if sharded else kept in (0, work["full_gradient_bytes"])
    assert rank0["layers"] == rank1["layers"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
    for a, b in zip(rank0["dual_norms"] + rank0["constants"], rank1["dual_norms"] + rank1["constants"], strict=True):
        assert torch.equal(a, b)
    # The same records as one process on the same global batch.
    reference = _reference_records(DSGDSettings(constants=constants, seed=3), steps, hidden)
    assert rank0["layers"] == [r.layer for r in reference]
    assert len(reference) == len(rank0["dual_norms"]) == steps
    for mine, theirs in zip(rank0["dual_norms"], reference, strict=True):
        torch.testing.assert_close(mine, theirs.dual_norms, rtol=1e-4, atol=1e-6)
    for mine, theirs in zip(rank0["constants"], reference, strict=True):
        torch.testing.assert_close(mine, theirs.constants, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_share_work_false_scores_every_layer_on_every_rank(tmp_path):
    run = launch("model_parallel", tmp_path, "--steps", "4", "--share-work", "false")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    work0, work1 = _work(tmp_path)
    assert not work0["shared"] and not work1["shared"]
    assert all(step["scored"] == 3 for step in work0["steps"] + work1["steps"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dsgd_ddp", "model_parallel"])
def test_adaptive_resume_with_shared_work_equals_the_uninterrupted_run(tmp_path, case):
    """Every layer moves each step and its owner alone measures the curvature: the state every
    rank keeps (and rank 0 saves) must still continue the run exactly."""
    full_run, resumed_run, checkpoints = tmp_path / "full", tmp_path / "resumed", tmp_path / "ckpt"
    for folder in (full_run, resumed_run):
        folder.mkdir()
    common = ["--constants", "adaptive", "--epochs", "2"]
    run = launch(case, full_run, *common, "--checkpoints", str(checkpoints))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (first_epoch,) = [p for p in checkpoints.iterdir() if p.name.startswith("epoch=0")]
    run = launch(case, resumed_run, *common, "--resume", str(first_epoch))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    uninterrupted, _ = results(full_run)
    resumed, _ = results(resumed_run)
    assert _work(resumed_run)[0]["shared"]
    for mine, theirs in zip(resumed["constants"], uninterrupted["constants"][8:], strict=True):
        assert torch.equal(mine, theirs)
    for name, value in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name


@pytest.mark.slow
def test_fused_attention_norms_and_empty_shards_share_work_under_plain_fsdp2():
    """Sharded fused q/k/v blocks, 1-D LayerNorm parameters and a one-row head (an empty shard):
    the shared steps equal those of every rank scoring every layer, bit for bit (and nothing hangs)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = Path(__file__).with_name("plain_fsdp_run.py")
    # PYTHONFAULTHANDLER: a worker that aborts prints every thread's Python stack.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parents[2]), "PYTHONFAULTHANDLER": "1"}
    run = subprocess.run([sys.executable, str(script), port], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and "identical" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "constants"), [("dsgd_ddp", "adaptive"), ("model_parallel", "data")])
def test_the_due_exact_weight_norms_are_balanced_over_the_ranks_and_all_hold_the_same_bounds(tmp_path, case, constants):
    steps = 6
    run = launch(case, tmp_path, "--constants", constants, "--steps", str(steps), "--hidden", "48")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    work0, work1 = _work(tmp_path)
    owners, followed = work0["owners"], work0["followed"]
    # Certified operator norms of the layers above the first; adaptive: the trust region's of every layer too.
    assert followed == ([[1, 2], [0, 1, 2]] if constants == "adaptive" else [[1, 2]])
    # The first step needs every exact value: the costliest first, each to the least-loaded rank,
    # the ranks' scoring work included.
    shapes = [(48, 7), (48, 49), (3, 49)]
    costs = [layer_cost(m, n, "spectral") for m, n in shapes]
    due = [i for indices in followed for i in indices]
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    computers = norm_owners([costs[i] for i in due], loads)
    for rank, work in enumerate((work0, work1)):
        assert work["steps"][0]["norms"] == [i for i, r in zip(due, computers, strict=True) if r == rank]
    assert set(computers) == {0, 1}  # both ranks compute some
    for mine, theirs in zip(work0["steps"], work1["steps"], strict=True):
        # Each due value is computed by one rank only.
        assert all((mine["norms"] + theirs["norms"]).count(i) <= sum(i in f for f in followed) for i in range(3))
    assert sum(len(s["norms"]) for w in (work0, work1) for s in w["steps"]) > 0
    for mine, theirs in zip(work0["steps"], work1["steps"], strict=True):
        assert len(mine["bounds"]) == len(followed)
        for a, b in zip(mine["bounds"], theirs["bounds"], strict=True):  # every rank holds the same bounds
            assert a.keys() == b.keys() == set(range(3)) - ({0} if a is mine["bounds"][0] else set())
            for i in a:
                assert a[i]["advanced"] == b[i]["advanced"] and a[i]["outgrown"] == b[i]["outgrown"]
                assert torch.equal(a[i]["value"], b[i]["value"]) and torch.equal(a[i]["exact"], b[i]["exact"])
