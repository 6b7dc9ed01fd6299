"""The benchmark harness (benchmarks/harness.py): its quick mode writes a complete page with its
plots, and its pieces (MNIST reader, learning-rate grid, sweeps) behave."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import bench_quality, bench_tasks, callback_overhead
from benchmarks.bench_common import make_device
from examples.datasets import write_fake_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_mode_writes_the_page_and_plots_within_a_minute(tmp_path):
    out = tmp_path / "benchmarks.md"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--quick", "--out", str(out)],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=170,
    )
    elapsed = time.perf_counter() - start
    text = out.read_text(encoding="utf-8")
    for heading in (
        "## Cost per step",
        "## How the cost grows",
        "## Profile of spectral DSGD's step",
        "## GPT-shaped model: the optimizer step against Muon",
        "## What it buys: optimization quality",
        "## Reading the numbers",
    ):
        assert heading in text
    for key in ("| date |", "| device | CPU", f"| torch | {torch.__version__} |", "| threads | 1 |"):
        assert key in text
    for arm in ("| SGD |", "| Adam |", "| Muon |", "| DSGD spectral data |", "| DSGD linf adaptive |"):
        assert arm in text  # every norm × constants mode beside the peers
    for arm in (
        "DSGD certified",
        "DSGD adaptive",
        "DSGD adaptive, greedy",
        "DSGD adaptive, cyclic",
        "output layer alone",
    ):
        assert f"| {arm} |" in text
    assert "Spectral DSGD's optimizer step costs" in text
    images = tmp_path / "images" / "benchmarks"
    for name in ("scaling.png", "quality_steps.png", "quality_time.png", "selection.png"):
        path = images / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size < 250_000
        assert f"(images/benchmarks/{name})" in text
    # The budget is one minute on an idle machine; a loaded CI box gets some slack.
    assert elapsed < 150, f"quick mode took {elapsed:.0f} s"


def test_mnist_is_read_from_idx_files_when_present_and_skipped_otherwise(tmp_path):
    write_fake_mnist(tmp_path, n_train=300, n_test=50)
    device = make_device("cpu")
    tasks, notes = bench_tasks.make_tasks(["mnist"], device, 0.02, str(tmp_path))
    assert notes == []
    (task,) = tasks
    assert task.train_x.shape == (300, 784) and task.val_x.shape == (50, 784) and task.eval_x.shape == (300, 784)
    assert 0.0 <= task.train_x.min() and task.train_x.max() <= 1.0
    assert task.train_y.dtype == torch.long
    assert task.make_model()(task.train_x[:2]).shape == (2, 10)

    tasks, notes = bench_tasks.make_tasks(["mnist"], device, 0.02, str(tmp_path / "absent"))
    if bench_tasks.find_mnist(None) is None:
        assert tasks == [] and "MNIST: skipped" in notes[0]


def test_rate_grid_neighbours():
    assert bench_quality.neighbour(0.1, up=True) == pytest.approx(0.3)
    assert bench_quality.neighbour(0.3, up=True) == pytest.approx(1.0)
    assert bench_quality.neighbour(1e-3, up=False) == pytest.approx(3e-4)
    assert bench_quality.neighbour(3e-3, up=False) == pytest.approx(1e-3)


def test_sweep_extends_past_an_edge_until_the_best_rate_is_interior(monkeypatch):
    """A loss minimised at lr = 1 found from the grid [0.01, 0.03]: the grid grows upwards."""

    def fake_run_seeds(task, arm, build, seeds, device, lr=None):
        import math

        loss = math.log10(lr) ** 2 + 0.1
        return [bench_quality.Run(s, [(0, 2.0, 0.0), (1, loss, 0.01)], loss, 0.5, 0.01, 1) for s in seeds]

    monkeypatch.setattr(bench_quality, "run_seeds", fake_run_seeds)
    plan = bench_quality.Plan(
        seeds=[0, 1, 2], selection_seeds=[0], sgd_grid=[], adam_grid=[], muon_grid=[], max_extend=5
    )
    result = bench_quality.sweep(None, "SGD", lambda lr: None, [0.01, 0.03], plan, None)  # type: ignore[arg-type]
    assert result.lr == pytest.approx(1.0)
    assert result.edge is None
    assert sorted(result.sweep) == pytest.approx([0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    assert [r.seed for r in result.runs] == [0, 1, 2]


def test_every_task_builds_and_its_model_reads_its_data():
    """Each task's data and model come from one builder (the examples' where they are the same):
    the model maps a batch of the task's inputs to logits over the classes of its labels."""
    names = [n for n in bench_tasks.ALL_TASKS if n != "mnist"]
    tasks, notes = bench_tasks.make_tasks(names, make_device("cpu"), step_scale=0.02)
    assert [t.name for t in tasks] == names and notes == []
    for task in tasks:
        torch.manual_seed(0)
        logits = task.make_model()(task.train_x[:2])
        assert logits.shape[:-1] == task.train_y[:2].shape
        assert logits.shape[-1] > int(max(task.train_y.max(), task.val_y.max()))
    with pytest.raises(SystemExit, match="unknown task 'nope'"):
        bench_tasks.make_tasks(["digits-64", "nope"], make_device("cpu"))


def test_callback_overhead_refuses_a_warmup_that_leaves_no_step_to_time(capsys):
    with pytest.raises(SystemExit) as stop:
        callback_overhead.main(["--steps", "20"])  # the default warm-up is 20 steps
    assert (
        stop.value.code == 2
        and "--warmup (20) must be at least 0 and less than --steps (20)" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_callback_overhead_prints_a_ratio_per_arm(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--steps", "6", "--warmup", "2", "--repeats", "1", "--width", "8", "--batches", "2", "--batch-size", "4"]
    callback_overhead.main(tiny)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 4 and all(float(row[-1]) > 0 for row in rows)
