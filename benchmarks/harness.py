"""Benchmark harness: what DSGD costs and what it buys, against SGD, Adam and Muon.

Runs every section and writes the Markdown page ``docs/benchmarks.md`` and its plots under
``docs/images/benchmarks/`` (rerun it whenever the optimizer changes):

1. cost per step — the optimizer step alone, the whole training step in a plain loop and in
   Lightning, for DSGD (every norm × every constants mode) and the peers (``bench_cost``);
2. scaling of that cost with depth, width and batch size;
3. a profile of spectral DSGD's step on a wide MLP, with cheaper exact methods timed beside it
   (``bench_profile``);
4. the optimizer step on a GPT-shaped model (4 pre-norm blocks, widths 256, 512, 1024, 1024 tokens):
   spectral DSGD on each path against Muon+AdamW (``bench_cost.measure_gpt``; ~7 min on 1 CPU
   thread, mostly width 1024; ``--sections gpt`` alone);
5. memory and bytes communicated per rank in a 2-process FSDP2 run against AdamW, and DSGD's scoring
   time per rank under 2-process DDP against one process (``bench_distributed``; spawned gloo processes,
   ~1 min; ``--sections distributed`` alone);
6. optimization quality on digits (full and mini-batch), a generated task whose hidden layers must
   learn, a ReLU CNN, a tiny transformer and MNIST when its files are present (``bench_quality``).

    python -m benchmarks.harness                      # default suite, ~20 min on 2 CPU cores
    python -m benchmarks.harness --quick --out /tmp/b.md   # smoke test, < 1 min
    python -m benchmarks.harness --device cuda        # the same on a GPU (untested so far)
    python -m benchmarks.harness --sections cost,profile --tasks digits-full

Timings are medians of interleaved repeats on whatever else the machine is doing; compare ratios
taken in one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from benchmarks.bench_common import ROOT, Device, environment, make_device
from benchmarks.bench_cost import (
    CONSTANTS,
    GPT_ARMS,
    NORMS,
    PEERS,
    Config,
    GPTConfig,
    Scaling,
    Timing,
    dsgd_arm,
    lightning_step_costs,
    measure,
    measure_gpt,
    scale,
)
from benchmarks.bench_distributed import (
    DistConfig,
    Distributed,
    check_devices,
    distributed_section,
    measure_distributed,
)
from benchmarks.bench_profile import Profile, profile_spectral
from benchmarks.bench_quality import PARTS, ArmResult, Plan, run_part
from benchmarks.bench_report import (
    TaskResult,
    adam_ratio_lines,
    cost_headlines,
    cost_table,
    gpt_section,
    ms,
    picks_text,
    plot_quality,
    plot_scaling,
    plot_selection,
    profile_section,
    quality_table,
    quality_verdicts,
    scaling_table,
    selection_lines,
    summary_lines,
    sweep_lines,
)
from benchmarks.bench_tasks import ALL_TASKS, Task, make_tasks

SECTIONS = ("cost", "scaling", "lightning", "profile", "gpt", "distributed", "quality")


@dataclass(frozen=True)
class Suite:
    cost: Config
    cost_warmup: int
    cost_repeats: int
    cost_budget_s: float
    scaling: dict[str, tuple[Config, list[int]]]
    scaling_warmup: int
    scaling_repeats: int
    scaling_budget_s: float
    cap_s: float
    skip_s: float
    lightning_steps: int
    lightning_warmup: int
    lightning_rounds: int
    profile_width: int
    profile_depth: int
    profile_steps: int
    gpt: GPTConfig
    gpt_widths: list[int]
    gpt_repeats: int
    tasks: tuple[str, ...]
    step_scale: float
    plan: Plan
    distributed: DistConfig


DEFAULT = Suite(
    cost=Config(),
    cost_warmup=3,
    cost_repeats=15,
    cost_budget_s=20.0,
    scaling={
        "depth": (Config(width=256, batch=128), [2, 4, 8, 16, 32]),
        "width": (Config(depth=3, batch=128), [64, 256, 1024, 4096]),
        "batch": (Config(width=256, depth=4), [32, 128, 512, 2048]),
    },
    scaling_warmup=1,
    scaling_repeats=5,
    scaling_budget_s=3.0,
    cap_s=2.0,
    skip_s=8.0,
    lightning_steps=60,
    lightning_warmup=10,
    lightning_rounds=5,
    profile_width=1024,
    profile_depth=4,
    profile_steps=4,
    gpt=GPTConfig(width=256),
    gpt_widths=[256, 512, 1024],
    gpt_repeats=3,
    tasks=ALL_TASKS,
    step_scale=1.0,
    plan=Plan(
        seeds=[0, 1, 2, 3, 4],
        selection_seeds=[0, 1],
        sgd_grid=[0.03, 0.1, 0.3, 1.0],
        adam_grid=[1e-3, 3e-3, 1e-2],
        muon_grid=[3e-3, 1e-2, 3e-2],
        max_extend=3,
    ),
    distributed=DistConfig(),
)

QUICK = Suite(
    cost=Config(in_features=16, width=32, depth=3, batch=32),
    cost_warmup=1,
    cost_repeats=2,
    cost_budget_s=0.0,
    scaling={
        "depth": (Config(in_features=16, width=32, batch=32), [2, 3]),
        "width": (Config(in_features=16, depth=3, batch=32), [16, 32]),
        "batch": (Config(in_features=16, width=32, depth=3), [16, 32]),
    },
    scaling_warmup=0,
    scaling_repeats=1,
    scaling_budget_s=0.0,
    cap_s=1.0,
    skip_s=4.0,
    lightning_steps=5,
    lightning_warmup=2,
    lightning_rounds=1,
    profile_width=64,
    profile_depth=3,
    profile_steps=2,
    gpt=GPTConfig(width=32, depth=2, vocab=64, length=16, batch=2, head_width=16),
    gpt_widths=[32],
    gpt_repeats=1,
    tasks=("digits-full", "transformer"),
    step_scale=0.06,
    plan=Plan(
        seeds=[0, 1],
        selection_seeds=[0],
        sgd_grid=[0.1, 0.3],
        adam_grid=[3e-3, 1e-2],
        muon_grid=[1e-2, 3e-2],
        max_extend=1,
    ),
    distributed=DistConfig(width=64, depth=3, batch=16, fsdp_steps=1, ddp_repeats=2),
)

COST_ARMS = [*PEERS] + [dsgd_arm(n, c) for n in NORMS for c in CONSTANTS]
SCALING_ARMS = [*PEERS] + [dsgd_arm(n) for n in NORMS]
LIGHTNING_ARMS = COST_ARMS


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- quality, in parallel
_TASK_CACHE: dict[tuple[str, str, float, str | None], Task] = {}


def _task(name: str, device: Device, step_scale: float, mnist_dir: str | None) -> Task:
    key = (name, str(device.torch_device), step_scale, mnist_dir)
    if key not in _TASK_CACHE:
        tasks, _ = make_tasks([name], device, step_scale, mnist_dir)
        _TASK_CACHE[key] = tasks[0]
    return _TASK_CACHE[key]


def _worker(job: tuple[str, str, Plan, str, float, str | None, int]) -> tuple[str, str, list[ArmResult], float]:
    name, part, plan, device_name, step_scale, mnist_dir, threads = job
    torch.set_num_threads(threads)
    device = make_device(device_name)
    begin = time.perf_counter()
    results = run_part(_task(name, device, step_scale, mnist_dir), part, plan, device)
    return name, part, results, time.perf_counter() - begin


def run_quality(tasks: list[Task], suite: Suite, args: argparse.Namespace, device: Device) -> list[TaskResult]:
    jobs = [
        (t.name, part, suite.plan, args.device, suite.step_scale, args.mnist_dir, args.threads)
        for t in tasks
        for part in PARTS
    ]
    for task in tasks:
        _TASK_CACHE[(task.name, str(device.torch_device), suite.step_scale, args.mnist_dir)] = task
    done: dict[tuple[str, str], list[ArmResult]] = {}
    if args.jobs <= 1 or device.is_cuda:
        for job in jobs:
            name, part, results, seconds = _worker(job)
            done[(name, part)] = results
            log(f"[quality] {name} / {part}: {seconds:.0f} s")
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            for name, part, results, seconds in pool.map(_worker, jobs):
                done[(name, part)] = results
                log(f"[quality] {name} / {part}: {seconds:.0f} s")
    order = {arm: k for k, arm in enumerate(suite.plan.arms)}  # DSGD arms in the plan's order, then the peers

    def arms(name: str) -> list[ArmResult]:
        return sorted((r for part in PARTS for r in done[(name, part)]), key=lambda r: order.get(r.arm, len(order)))

    return [TaskResult(t, arms(t.name)) for t in tasks]


# ---------------------------------------------------------------------------------------------- the page
@dataclass
class Outcome:
    env: dict[str, str]
    suite_name: str
    cost: Timing | None = None
    lightning: dict[str, float] = field(default_factory=dict)
    lightning_picks: dict[str, list[int]] = field(default_factory=dict)
    scalings: list[Scaling] = field(default_factory=list)
    profile: Profile | None = None
    gpt: dict[int, Timing] = field(default_factory=dict)
    distributed: Distributed | None = None
    quality: list[TaskResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def write_page(outcome: Outcome, suite: Suite, out: str, images: str, device: Device) -> None:
    os.makedirs(images, exist_ok=True)
    rel = os.path.relpath(images, os.path.dirname(os.path.abspath(out)))

    def image(name: str) -> str:
        return f"{rel}/{name}".replace(os.sep, "/")

    env = outcome.env
    total = sum(outcome.seconds.values())
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/harness.py: do not edit by hand, rerun the harness. -->",
        "",
        f"Generated by `python -m benchmarks.harness{' --quick' if outcome.suite_name == 'quick' else ''}"
        f"{'' if not device.is_cuda else ' --device ' + str(device.torch_device)}` ({outcome.suite_name} suite) "
        f"in {total / 60:.1f} min. What DSGD costs per step and what it buys in optimization, against "
        "`torch.optim.SGD`, `torch.optim.Adam` and `torch.optim.Muon` (Muon on the hidden 2-D weights, AdamW on "
        "the rest). Rerun it whenever the optimizer changes.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in env.items()],
        f"| sections (wall time) | {', '.join(f'{k} {v:.0f} s' for k, v in outcome.seconds.items())} |",
        "",
    ]
    if not device.is_cuda:
        lines += [
            "The harness also runs on a GPU (`--device cuda`: models and data on the device, every timing "
            "synchronised with `torch.cuda.synchronize`, the GPU's name recorded above); that path has not "
            "been run yet.",
            "",
        ]
    lines += [
        "Timings are medians of repeats in which the compared optimizers alternate call by call, so that "
        "the load of a shared machine hits them alike; read the ratios, which are taken within one run, "
        "rather than the absolute times. On a loaded machine (see the load average above) a call longer than a "
        "scheduler time slice (a few ms) is preempted more often than a short one, which inflates the slower "
        "arms somewhat.",
        "",
    ]

    if outcome.cost is not None:
        config = suite.cost
        lines += [
            "## Cost per step",
            "",
            f"Same model for every optimizer: {config.describe()}, {device.torch_device.type}. *Step alone*: "
            "`optimizer.step()` on gradients computed once (the forward that DSGD's data constants need runs "
            "before each timed step, untimed, for every arm). *Whole step*: zero_grad, forward, cross-entropy, "
            "backward, step, in a plain loop. *Lightning step*: `Trainer.fit` on the same model and batch size — "
            "an ordinary automatic-optimization `LightningModule` for the peers, the same module with `DSGDMixin` "
            "for DSGD — timed by a callback from `on_train_batch_start` to `on_train_batch_end` (median over "
            f"steps after the first {suite.lightning_warmup}, then over {suite.lightning_rounds} alternating fits).",
            "",
            *cost_table(config, outcome.cost, outcome.lightning),
            "",
            f"Layers DSGD moved (input layer first) in the whole-step repeats, on one fixed batch: "
            f"{picks_text(outcome.cost.picks)}; in the Lightning fits, on shuffled batches: "
            f"{picks_text(outcome.lightning_picks)}. The cost of a step depends on that choice: moving a hidden "
            "layer costs an SVD of its block (spectral update) and of its weight (σ_max for the certified "
            "constants), moving the output layer little.",
            "",
        ]
    if outcome.scalings:
        lines += [
            "## How the cost grows",
            "",
            "Each cell: optimizer step alone / whole step, ms (whole step ÷ SGD's). DSGD arms use data constants. "
            f"A call longer than {suite.cap_s:g} s is not repeated (1 sample); an arm whose next call is predicted "
            f"above {suite.skip_s:g} s (cubic growth in width for the SVDs and Newton–Schulz, linear otherwise) "
            "is skipped.",
            "",
        ]
        for scaling in outcome.scalings:
            lines += [
                f"**{scaling.dimension}** (tanh MLP, {scaling.base.describe_except(scaling.dimension)}; "
                f"the varied one runs through {', '.join(map(str, scaling.values))})",
                "",
                *scaling_table(scaling),
                "",
            ]
        plot_scaling(outcome.scalings, os.path.join(images, "scaling.png"))
        lines += [f"![cost scaling]({image('scaling.png')})", ""]
    if outcome.profile is not None:
        lines += [
            "## Profile of spectral DSGD's step",
            "",
            *profile_section(outcome.profile),
            "",
            *profile_reading(outcome.profile),
            "",
        ]
    if outcome.gpt:
        lines += gpt_section(suite.gpt, outcome.gpt, device.describe(), int(env.get("threads", "1")))
    if outcome.distributed is not None:
        lines += distributed_section(outcome.distributed)
    if outcome.quality:
        lines += quality_section(outcome.quality, suite, images, image)
    lines += ["## Reading the numbers", ""]
    if outcome.cost is not None:
        lines += cost_headlines(suite.cost, outcome.cost, outcome.lightning, outcome.scalings)
    if outcome.quality:
        lines += quality_verdicts(outcome.quality)
    lines += [f"- {note}" for note in outcome.notes]
    with open(out, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines).rstrip() + "\n")


def profile_reading(profile: Profile) -> list[str]:
    svdvals = profile.kernels.get("svdvals (exact nuclear norm)", math.nan)
    svd = profile.kernels.get("svd (exact duality map)", math.nan)
    sigma = profile.kernels.get("σ_max of the weight (svdvals)", math.nan)
    sketch_map = [v for k, v in profile.kernels.items() if k.startswith("sketched duality map")]
    sketch_nuc = [v for k, v in profile.kernels.items() if k.startswith("sketched nuclear")]
    lines = ["What the package does about it:", ""]
    if sketch_map and sketch_nuc:
        lines.append(
            "- **Sketched nuclear norm and polar factor.** A layer fed `N` input rows per step (counted by the "
            "forward hook; × the data-parallel ranks) has a gradient of rank ≤ `N`. With `k = N + 8`, "
            "`Q = qr((ΩG)ᵀ)` (`Ω` Gaussian, `n × k`) and `B = G Q` (`m × k`), the SVD of `B` gives the nuclear "
            f"norm and the polar factor: {ms(sketch_nuc[0])} ms instead of {ms(svdvals)} ms for the score of one "
            f"hidden block, {ms(sketch_map[0])} ms instead of {ms(svd)} ms for its direction (relative error of "
            f"the nuclear norm {profile.sketch_error:.1e}). For any `Q` the direction `D = U_B (Q V_B)ᵀ` has "
            "`‖D‖₂ = 1` and `⟨G, D⟩ = ‖B‖_*` exactly, so `‖B‖²_*/L` is the guaranteed decrease of the step "
            "actually applied, and it equals `‖G‖²_*/L` when the rank bound holds. Blocks with `k` above 0.6 × "
            "their smaller side keep the exact SVD (the sketch stops paying there)."
        )
    lines += [
        f"- **σ_max of a moved weight** ({ms(sigma)} ms per `svdvals` here): after `W ← W + Δ`, "
        "`‖W + Δ‖₂ ≤ ‖W‖₂ + ‖Δ‖₂` with `‖Δ‖₂` known from the step (inflated for rounding) keeps the "
        "constants certified; the exact value is recomputed once the bound has grown 2% past it, or when the "
        "weight changed from outside. Frobenius DSGD gains the same (its constants use the spectral operator "
        "norm too).",
        "- Same-shape blocks share one batched `svdvals` call; on a CPU that saves only the call overhead "
        "(LAPACK loops over the batch), on a GPU it batches the kernels.",
    ]
    return lines


def quality_section(entries: list[TaskResult], suite: Suite, images: str, image) -> list[str]:  # type: ignore[no-untyped-def]
    plan = suite.plan
    lines = [
        "## What it buys: optimization quality",
        "",
        f"{len(plan.seeds)} seeds per arm (seeds {', '.join(map(str, plan.seeds))}); a seed fixes the initial weights "
        "(the same in every arm) and the mini-batch order. Arms:",
        "",
        '- **DSGD adaptive**: `DSGD(model)`, no argument — the default, `constants="adaptive"` — in both regimes '
        "(no `full_batch` declared): spectral norm; every layer steps along its own duality map by `η/L_i` with "
        "`L_i` corrected by the curvature met (the Muon / PolarGrad family, with per-layer step sizes instead of a "
        "learning rate), each step at most 0.2 of the layer's weight norm.",
        '- **DSGD certified**: `DSGD(model, constants="data")`, the paper\'s algorithm: one greedy layer per step; '
        "certified data constants, run on the tanh MLPs only (outside the rigorous class no certificate exists and "
        '`constants="data"` behaves as the adaptive default).',
        "- **DSGD adaptive, greedy / random / cyclic**: the same adaptive constants, one layer per step "
        '(`layers_per_step=1`), chosen greedily (the paper\'s rule), at random (`selection="random"`) or in turn '
        '(`selection="cyclic"`).',
        '- **DSGD adaptive, momentum 0.9**: `DSGD(model, constants="adaptive", momentum=0.9)`.',
        "- **output layer alone**: every parameter below the output layer frozen; the output layer trained by "
        '`DSGD(nn.Sequential(head), constants="data")` (a one-layer chain, with its certified constant).',
        "- **SGD, Adam**: learning rate swept on a 1–3–10 log grid on seeds "
        f"{', '.join(map(str, plan.selection_seeds))} "
        f"(initial grids SGD {plan.sgd_grid}, Adam {plan.adam_grid}); when the best rate (lowest mean final "
        f"training loss) is at an edge of the rates tried the grid is extended past it (up to {plan.max_extend} "
        "times), and the best rate is then run on every seed. No momentum, no weight decay, no schedule.",
        "- **Muon**: `torch.optim.Muon` (defaults: momentum 0.95, Nesterov, 5 Newton–Schulz steps) on the 2-D "
        "weights of the hidden linear layers (attention projections included; convolution kernels are 4-D and "
        f"stay with AdamW), AdamW at the task's best Adam rate on the rest; Muon's rate swept as above "
        f"(initial grid {plan.muon_grid}). Weight decay 0.",
        "",
        "Steps and seconds to a target: first evaluation at or below it (mean ± std over the seeds that reach "
        "it; `(k/n)`: only k of n seeds did). Seconds count the training steps only (evaluations excluded). "
        "Final train loss: mean ± std over seeds; validation accuracy on held-out data. `(highest tried)` / "
        "`(lowest tried)` mark a best rate still at the edge after the extensions.",
        "",
        "### DSGD adaptive against best-tuned Adam",
        "",
        '`DSGD(model)` (the default, `constants="adaptive"`) with no argument, against Adam at its best swept rate, '
        "steps and training seconds to each target (mean over the seeds that reach it; target: at most 1.5× "
        "Adam's steps):",
        "",
        *adam_ratio_lines(entries),
        "",
        *summary_lines(entries),
        "",
    ]
    for entry in entries:
        task = entry.task
        lines += [
            f"### {task.title}",
            "",
            f"{task.model_text}; {len(task.train_y)} training samples, {task.regime}, {task.steps} steps, training "
            f"loss evaluated every {task.eval_every} step(s) on {len(task.eval_y)} training samples"
            f"{'' if task.rigorous else ' (outside the rigorous class)'}.",
            "",
            *quality_table(entry),
            "",
            "Learning-rate sweeps (mean final training loss on the selection seeds; bold: chosen):",
            "",
            *sweep_lines(entry),
            "",
            "Layer selection (share of steps per layer over every seed; the order of the first picks of one "
            "seed as `layer×count`):",
            "",
            *selection_lines(entry),
            "",
        ]
    plot_quality(entries, os.path.join(images, "quality_steps.png"), "steps")
    plot_quality(entries, os.path.join(images, "quality_time.png"), "seconds")
    plot_selection(entries, os.path.join(images, "selection.png"))
    lines += [
        "Training loss against steps and against training seconds (median over seeds, band: min–max):",
        "",
        f"![loss against steps]({image('quality_steps.png')})",
        "",
        f"![loss against time]({image('quality_time.png')})",
        "",
        "Which layers DSGD moves (share of steps):",
        "",
        f"![layer selection]({image('selection.png')})",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (< 1 min)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument(
        "--jobs", type=int, default=None, help="parallel processes for the quality runs (CPU only; default 2, quick 1)"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--tasks", default=None, help=f"comma-separated subset of {ALL_TASKS}")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of every quality arm")
    parser.add_argument(
        "--mnist-dir", default=None, help="folder with the MNIST IDX files (else $MNIST_DIR, data/MNIST/raw)"
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"), help="the Markdown page")
    parser.add_argument("--images", default=None, help="plot folder (default: images/benchmarks beside --out)")
    parser.add_argument("--json", default=None, help="also dump the raw results as JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; use {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> Outcome:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    device = make_device(args.device)
    suite = QUICK if args.quick else DEFAULT
    if args.jobs is None:
        args.jobs = 1 if args.quick else 2
    if args.seeds:
        plan = dataclasses.replace(
            suite.plan,
            seeds=args.seeds,
            selection_seeds=[s for s in suite.plan.selection_seeds if s in args.seeds] or args.seeds[:1],
        )
        suite = dataclasses.replace(suite, plan=plan)
    if args.tasks:
        suite = dataclasses.replace(suite, tasks=tuple(args.tasks.split(",")))
    sections = args.sections.split(",")
    if "distributed" in sections:
        check_devices(suite.distributed, args.device)
    outcome = Outcome(environment(device, started), "quick" if args.quick else "default")
    log(f"benchmarks on {outcome.env['device']}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        begin = time.perf_counter()
        log(f"[{name}] …")
        value = fn()
        outcome.seconds[name] = time.perf_counter() - begin
        log(f"[{name}] {outcome.seconds[name]:.0f} s")
        return value

    if "cost" in sections:
        outcome.cost = timed(
            "cost",
            lambda: measure(
                suite.cost, COST_ARMS, device, suite.cost_warmup, suite.cost_repeats, suite.cap_s, suite.cost_budget_s
            ),
        )
    if "lightning" in sections:
        outcome.lightning, outcome.lightning_picks = timed(
            "lightning",
            lambda: lightning_step_costs(
                suite.cost,
                LIGHTNING_ARMS,
                device,
                suite.lightning_steps,
                suite.lightning_warmup,
                suite.lightning_rounds,
                log,
            ),
        )
    if "scaling" in sections:

        def scalings() -> list[Scaling]:
            return [
                scale(
                    dim,
                    values,
                    base,
                    SCALING_ARMS,
                    device,
                    suite.scaling_warmup,
                    suite.scaling_repeats,
                    suite.cap_s,
                    suite.skip_s,
                    log,
                    suite.scaling_budget_s,
                )
                for dim, (base, values) in suite.scaling.items()
            ]

        outcome.scalings = timed("scaling", scalings)
    if "profile" in sections:
        outcome.profile = timed(
            "profile",
            lambda: profile_spectral(
                device, suite.profile_width, suite.profile_depth, 128 if not args.quick else 32, suite.profile_steps, 3
            ),
        )
    if "gpt" in sections:

        def gpt() -> dict[int, Timing]:
            timings = {}
            for width in suite.gpt_widths:
                config = dataclasses.replace(suite.gpt, width=width)
                timings[width] = measure_gpt(config, GPT_ARMS, device, 1, suite.gpt_repeats)
                log(f"  width {width}: " + ", ".join(f"{a} {t * 1e3:.0f} ms" for a, t in timings[width].step.items()))
            return timings

        outcome.gpt = timed("gpt", gpt)
    if "distributed" in sections:
        outcome.distributed = timed("distributed", lambda: measure_distributed(suite.distributed, args.device))
    if "quality" in sections:
        tasks, notes = make_tasks(list(suite.tasks), device, suite.step_scale, args.mnist_dir)
        outcome.notes += notes
        outcome.quality = timed("quality", lambda: run_quality(tasks, suite, args, device))
    images = args.images or os.path.join(os.path.dirname(os.path.abspath(args.out)), "images", "benchmarks")
    write_page(outcome, suite, args.out, images, device)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(_jsonable(outcome), handle, indent=1, default=str)
    log(f"wrote {args.out} ({(time.time() - started) / 60:.1f} min)")
    return outcome


def _jsonable(outcome: Outcome) -> dict:
    data = {
        "env": outcome.env,
        "suite": outcome.suite_name,
        "seconds": outcome.seconds,
        "cost": None if outcome.cost is None else dataclasses.asdict(outcome.cost),
        "lightning": outcome.lightning,
        "lightning_picks": outcome.lightning_picks,
        "scalings": [dataclasses.asdict(s) for s in outcome.scalings],
        "profile": None if outcome.profile is None else dataclasses.asdict(outcome.profile),
        "gpt": {width: dataclasses.asdict(t) for width, t in outcome.gpt.items()},
        "distributed": None if outcome.distributed is None else dataclasses.asdict(outcome.distributed),
        "quality": [
            {"task": e.task.name, "results": [dataclasses.asdict(r) for r in e.results]} for e in outcome.quality
        ],
    }
    return data


if __name__ == "__main__":
    main()
