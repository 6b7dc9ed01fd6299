"""Real 2-process runs on CPU (gloo): DDP and FSDP2 choose the same layers on every rank, keep
identical weights, and follow the single-process trajectory on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_mixin import reference_run

from lightning_dsgd import DSGDSettings

SCRIPT = Path(__file__).with_name("distributed_run.py")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")]


def launch(case: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    # The package of this checkout, not an installed copy of another.
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[2]), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--case", case, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=out,
    )


def results(out: Path) -> tuple[dict, dict]:
    return (torch.load(out / "rank0.pt", weights_only=False), torch.load(out / "rank1.pt", weights_only=False))


@pytest.mark.parametrize(
    ("case", "norm", "constants", "hidden"),
    [
        ("dsgd_ddp", "spectral", "data", 8),
        ("ddp_with_mixin", "linf", "architecture", 8),
        ("mixinless", "frobenius", "data", 8),
        ("model_parallel", "spectral", "data", 8),
        ("model_parallel", "linf", "data", 8),
        # Hidden 48 × 49 blocks, 8 rows per global batch: scored through the sketch (k = 16).
        ("dsgd_ddp", "spectral", "data", 48),
        ("model_parallel", "spectral", "adaptive", 48),
    ],
)
def test_ranks_agree_and_match_the_single_process_run(tmp_path, case, norm, constants, hidden):
    run = launch(case, tmp_path, "--norm", norm, "--constants", constants, "--steps", "10", "--hidden", str(hidden))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0, rank1 = results(tmp_path)
    assert rank0["optimizer"] == rank1["optimizer"] == "DSGD"
    assert rank0["layers"] == rank1["layers"] and len(rank0["layers"]) == 10
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
    reference, layers = reference_run(DSGDSettings(norm=norm, constants=constants, seed=3), 10, hidden=hidden)
    assert rank0["layers"] == layers
    # Adaptive constants move every layer every step: float32 rounding of the sharded reductions
    # accumulates over three times the updates.
    atol = 1e-5 if constants == "adaptive" else 1e-6
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(rank0["weights"][name], value, rtol=1e-5, atol=atol, msg=name)


def test_verification_names_the_rank_that_diverged(tmp_path):
    run = launch("diverge", tmp_path, "--steps", "8")
    assert run.returncode != 0
    assert "DSGD ranks diverged at step 4" in run.stderr and "rank 1" in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("case", ["dsgd_ddp", "model_parallel"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, case):
    """8 steps per epoch; resume from the end of epoch 0 and compare steps 9–16 and the weights."""
    full_run, resumed_run, checkpoints = tmp_path / "full", tmp_path / "resumed", tmp_path / "ckpt"
    for folder in (full_run, resumed_run):
        folder.mkdir()
    # Whole epochs: Lightning replays a batch when an epoch-end checkpoint is resumed under max_steps.
    common = ["--selection", "random", "--epochs", "2"]
    run = launch(case, full_run, *common, "--checkpoints", str(checkpoints))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (first_epoch,) = [p for p in checkpoints.iterdir() if p.name.startswith("epoch=0")]
    run = launch(case, resumed_run, *common, "--resume", str(first_epoch))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    uninterrupted, _ = results(full_run)
    resumed, _ = results(resumed_run)
    assert resumed["layers"] == uninterrupted["layers"][8:]
    for name, value in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name


def test_ranks_seeded_differently_still_choose_alike(tmp_path):
    """Each rank takes rank 0's random choice: identical choices and weights by construction."""
    run = launch("per_rank_seed", tmp_path, "--steps", "8")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0, rank1 = results(tmp_path)
    assert rank0["layers"] == rank1["layers"] and len(set(rank0["layers"])) > 1
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name


def test_the_default_agreement_check_stops_ranks_whose_gradients_differ(tmp_path):
    run = launch("unsynced", tmp_path, "--steps", "6")
    assert run.returncode != 0
    assert "DSGD ranks disagree at step 2" in run.stderr and "were not averaged" in run.stderr, run.stderr[-3000:]
