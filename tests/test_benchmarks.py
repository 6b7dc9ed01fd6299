"""The benchmark harness (benchmarks/harness.py): its quick mode writes a complete page with its
plots, and its pieces (MNIST reader, learning-rate grid, sweeps) behave."""

from __future__ import annotations

import inspect
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
        "## Distributed: memory and communication per rank",
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
    assert "Where the matmul path's step goes" in text  # the GPT step in parts
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


# ---------------------------------------------------------------------------------------------- distributed section
def _known_collectives(rank: int, config, device) -> dict:
    """Collectives of known payload on 2 ranks, counted by CollectiveBytes."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from benchmarks.bench_distributed import CollectiveBytes

    mesh = init_device_mesh("cpu", (2,))
    sharded = distribute_tensor(torch.zeros(8, 16), mesh, [Shard(0)])
    with CollectiveBytes() as counter:
        dist.all_reduce(torch.ones(1000))
        dist.all_gather([torch.empty(300) for _ in range(2)], torch.ones(300))
        dist.all_gather_into_tensor(torch.empty(1000, dtype=torch.float64), torch.ones(500, dtype=torch.float64))
        dist.reduce_scatter_tensor(torch.empty(250), torch.ones(500))
        dist.broadcast(torch.zeros(100, dtype=torch.int64), src=0)
        dist.barrier()
        counter.phase = "dtensor"
        sharded.full_tensor()
        funcol.all_reduce(torch.ones(64), "sum", mesh).wait()
    return {phase: dict(ops) for phase, ops in counter.bytes.items()}


def test_collective_counter_counts_known_collectives_exactly():
    from benchmarks.bench_distributed import DistConfig, launch

    for counted in launch(_known_collectives, DistConfig(), "cpu", 2):
        assert counted == {
            "other": {
                "c10d::allreduce_": 4000,
                "c10d::allgather_": 2400,
                "c10d::_allgather_base_": 8000,
                "c10d::_reduce_scatter_base_": 2000,
                "c10d::broadcast_": 800,
            },
            "dtensor": {
                "_c10d_functional::all_gather_into_tensor": 8 * 16 * 4,
                "_c10d_functional::all_reduce": 64 * 4,
            },
        }


@pytest.mark.slow
def test_distributed_section_runs_at_a_tiny_size():
    """2-process FSDP2 and DDP runs: FSDP2's own traffic is exactly twice (all-gathers) and once
    (reduce-scatters) the parameters, AdamW holds its four shards, and the page section is written."""
    from benchmarks.bench_distributed import DistConfig, comm_bytes, distributed_section, measure_distributed

    config = DistConfig(width=32, depth=3, classes=8, batch=8, fsdp_steps=1, ddp_warmup=0, ddp_repeats=1)
    result = measure_distributed(config)
    params = result.param_bytes
    assert params == (32 * 33 * 2 + 8 * 33) * 4
    assert result.fsdp[0].arm == "AdamW" and len(result.fsdp) >= 2
    for arm in result.fsdp:
        assert comm_bytes(arm, "forward_backward", "allgather") == 2 * params, arm
        assert comm_bytes(arm, "forward_backward", "reduce_scatter") == params, arm
        for rank in range(config.world):  # up to the buffers of one collective (see ProfiledMemory)
            assert 0 < arm.resident[rank] <= arm.step_peak[rank] + arm.uncertainty[rank], arm
            assert arm.optimizer_peak[rank] <= arm.step_peak[rank] + arm.uncertainty[rank], arm
            # The blur is made of collective buffers (frees on gloo's threads, a pending collective's
            # tensors): below what the step's collectives carried, not an unbounded drift. A bound of one
            # model's worth failed once in CI on this 9.5 KiB model (11 KiB: shared work's per-layer gathers).
            assert arm.uncertainty[rank] <= comm_bytes(arm), arm
    adamw = result.fsdp[0]
    assert comm_bytes(adamw, "optimizer") == 0
    # Shards of parameters, gradients and the two moments: 4 × params / 2 per rank, plus the data.
    data = config.world * config.batch * (config.width * 4 + 8)
    for resident in adamw.resident:
        assert 2 * params <= resident <= 2 * params + data + 16 * 1024, (adamw, params, data)
    dsgd = result.fsdp[1]
    assert comm_bytes(dsgd, "optimizer") > 0  # full gradients gathered, or the scores' agreement
    assert result.single is not None and len(result.ddp) == len(result.fsdp) - 1
    assert all(s > 0 for arm in result.ddp for s in arm.score_seconds + arm.step_seconds)
    text = "\n".join(distributed_section(result))
    assert "## Distributed: memory and communication per rank" in text
    assert "2.000 × the parameters" in text and "(1.000 ×, expected 1)" in text
    assert "FSDP2 peak memory per rank ≤ AdamW's" in text


def test_profiled_memory_measures_a_known_peak_exactly():
    """Held bytes at the phase's start plus the profiler's rise: 1 MiB kept, 2 MiB and 3 MiB temporaries."""
    from benchmarks.bench_distributed import ProfiledMemory

    mib = 2**20
    kept = []
    with ProfiledMemory() as meter:
        held = torch.zeros(mib // 4)  # 1 MiB held before the phases
        for step in range(2):
            with meter.mark(f"phase/{step}"):
                kept.append(torch.zeros(mib // 4))
                a = torch.zeros(2 * mib // 4)
                b = torch.zeros(3 * mib // 4)
                del a, b
    ((peak, resident, uncertainty),) = meter.peaks(("phase",)).values()
    assert held.numel() == mib // 4
    assert peak - resident == 5 * mib  # 2 and 3 MiB live at once on top of what the last phase held
    assert uncertainty == 0


def test_distributed_arms_follow_the_optimizer_and_cuda_needs_a_gpu_per_rank(monkeypatch):
    from benchmarks import bench_distributed

    has_option = "share_work" in inspect.signature(bench_distributed.DSGD).parameters
    assert [kwargs for _, kwargs in bench_distributed.dsgd_arms()] == (
        [{"share_work": False}, {"share_work": True}] if has_option else [{}]
    )

    class Sharing:
        def __init__(self, model, *, share_work: bool = True) -> None: ...

    monkeypatch.setattr(bench_distributed, "DSGD", Sharing)
    assert [label for label, _ in bench_distributed.dsgd_arms()] == [
        "DSGD, share_work=False",
        "DSGD, share_work=True",
    ]
    if torch.cuda.device_count() < 2:
        with pytest.raises(SystemExit, match="needs 2 GPUs"):
            bench_distributed.check_devices(bench_distributed.DistConfig(), "cuda")


def test_rss_meter_reads_a_known_temporary_and_nested_phases():
    """The peak-RSS meter of the distributed section: a phase that writes and frees a 32 MiB tensor
    reads 32 MiB (page granularity, a little heap noise), and an outer phase sees its inner peak."""
    from benchmarks.bench_distributed import RSS_CHECK_BYTES, RssMemory, rss_check, rss_meter_available

    if not rss_meter_available():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    assert abs(rss_check() - RSS_CHECK_BYTES) < RSS_CHECK_BYTES // 8
    meter = RssMemory()
    with meter, meter.mark("outer/0"):
        with meter.mark("inner/0"):
            temporary = torch.ones(RSS_CHECK_BYTES // 4)
            del temporary
        small = torch.ones(1024)
        del small
    peaks = meter.peaks(("outer", "inner", "never"))
    assert peaks["inner"][0] > RSS_CHECK_BYTES * 7 // 8
    assert peaks["outer"][0] >= peaks["inner"][0]
    assert peaks["never"] == (0, 0, 0)


def test_gpt_parts_time_the_matmul_path_in_pieces_and_leave_the_geometry_as_it_was():
    from benchmarks.bench_cost import GPT_ARMS, GPT_PARTS, GPTConfig, measure_gpt
    from benchmarks.bench_report import gpt_parts_table
    from lightning_dsgd import geometry, polar

    config = GPTConfig(width=32, depth=1, vocab=64, length=16, batch=2, head_width=16)
    timing = measure_gpt(config, GPT_ARMS, make_device("cpu"), 0, 1)
    assert all(timing.step[part] > 0 for part in GPT_PARTS)
    assert geometry.polar_directions is polar.polar_directions  # the recording wrapper is gone
    header, _, row = gpt_parts_table({32: timing})
    assert "certificate (ms)" in header and row.startswith("| 32 | ") and row.count("|") == header.count("|")
    without = measure_gpt(config, GPT_ARMS, make_device("cpu"), 0, 1, parts_too=False)
    assert not set(GPT_PARTS) & set(without.step) and gpt_parts_table({32: without}) == []
