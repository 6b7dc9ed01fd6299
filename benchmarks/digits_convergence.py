"""Steps to a training loss of 0.5 and 0.1 on scikit-learn's digits: DSGD against tuned SGD and Adam.

The model is the tanh MLP 64-128-128-10 (``Linear, Tanh, Linear, Tanh, Linear``, PyTorch's default
init after ``torch.manual_seed(seed)``), the data all 1797 digits (``X / 16`` as float32), the loss
softmax cross-entropy. Two regimes: full batch, and mini-batches of 64 (reshuffled every epoch by a
generator seeded with the seed, the last incomplete batch dropped). Four arms, on the same inits:

1. certified DSGD: ``DSGD(model, constants="data")`` (spectral norm, η = 1),
2. adaptive DSGD: ``DSGD(model, constants="adaptive")`` (the default: every layer per step),
   both with ``full_batch=True`` in the full-batch regime;
3. SGD, best learning rate of ``--sgd-grid``;
4. Adam, best learning rate of ``--adam-grid``.

"Best" is the learning rate whose seeds all (or most) reach 0.1 in the fewest mean steps: ranked by
seeds reaching 0.1 (more first), mean steps to 0.1, seeds reaching 0.5, mean steps to 0.5, then mean
final loss. A winner at an end of its grid is flagged: a wider grid might do better.

The full-data loss is checked every ``--eval-every`` steps (default: every step full batch, where it
is the loss the next step computes anyway and costs nothing; every 5 steps with mini-batches, so
those step counts are multiples of 5). A run stops once its loss reaches 0.1, or after
``--max-steps``; "final loss" is the full-data loss where the run stopped (so ≤ 0.1 for runs that
got there; pass ``--no-early-stop`` to run every arm for ``--max-steps``). Steps are reported as
mean ± sample std over the seeds that reached the target, with how many did ("—": none).
"ms/step" is the wall time of a training step (forward, backward, optimizer step; full-data
evaluations excluded), averaged over seeds; it is indicative only on a shared machine. Most of the
default runtime is the full-batch learning-rate sweeps (step-bound, the loss checks are free there).

    python benchmarks/digits_convergence.py                       # 5 seeds, both regimes: ~11 min of CPU
    python benchmarks/digits_convergence.py --quick               # smoke test: ~25 s of CPU
    python benchmarks/digits_convergence.py --regimes 64 --seeds 0 1 2 --out digits.md
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import lightning_dsgd
from lightning_dsgd import DSGD

TARGETS = (0.5, 0.1)
SGD_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
QUICK_SGD_GRID = (0.1, 0.3)
QUICK_ADAM_GRID = (3e-3, 1e-2)
MINI_BATCH_EVAL_EVERY = 5

OptimizerFactory = Callable[[nn.Module, bool], torch.optim.Optimizer]


@dataclass(frozen=True)
class Data:
    x: Tensor
    y: Tensor


@dataclass(frozen=True)
class Regime:
    name: str
    batch_size: int | None
    eval_every: int


@dataclass(frozen=True)
class Options:
    data: Data
    seeds: list[int]
    max_steps: int
    early_stop: bool
    sgd_grid: list[float]
    adam_grid: list[float]


@dataclass(frozen=True)
class Arm:
    """One optimizer setting; ``factory(model, full_batch)`` builds the optimizer."""

    name: str
    lr: float | None
    factory: OptimizerFactory


@dataclass(frozen=True)
class Run:
    """One seed of one arm. ``hits[target]``: the first checked step whose full-data loss was ≤ target."""

    seed: int
    hits: dict[float, int | None]
    final_loss: float
    steps: int
    seconds_per_step: float
    selection_counts: list[int] | None


@dataclass(frozen=True)
class Result:
    """All seeds of one arm, plus (for a learning-rate sweep) every learning rate tried."""

    arm: Arm
    runs: list[Run]
    edge: str | None = None
    sweep: tuple[Result, ...] = ()

    def reached(self, target: float) -> list[int]:
        return [h for run in self.runs if (h := run.hits[target]) is not None]

    def mean_steps(self, target: float) -> float:
        steps = self.reached(target)
        return statistics.fmean(steps) if steps else math.inf

    def mean_final_loss(self) -> float:
        losses = [run.final_loss for run in self.runs]
        return statistics.fmean(losses) if all(math.isfinite(v) for v in losses) else math.inf

    def rank_key(self) -> tuple[float, ...]:
        """Smaller is better: most seeds reaching 0.1, fewest steps to it, then the same for 0.5,
        then the lowest final loss."""
        low, high = min(TARGETS), max(TARGETS)
        return (
            -len(self.reached(low)),
            self.mean_steps(low),
            -len(self.reached(high)),
            self.mean_steps(high),
            self.mean_final_loss(),
        )


# ---------------------------------------------------------------------------------------------- setup
def load_data() -> Data:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return Data(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))


def certified_dsgd(model: nn.Module, full_batch: bool) -> torch.optim.Optimizer:
    return DSGD(model, constants="data", full_batch=full_batch)


def adaptive_dsgd(model: nn.Module, full_batch: bool) -> torch.optim.Optimizer:
    return DSGD(model, constants="adaptive", full_batch=full_batch)


def sgd(lr: float) -> OptimizerFactory:
    return lambda model, _full_batch: torch.optim.SGD(model.parameters(), lr=lr)


def adam(lr: float) -> OptimizerFactory:
    return lambda model, _full_batch: torch.optim.Adam(model.parameters(), lr=lr)


# ---------------------------------------------------------------------------------------------- training
def full_loss(model: nn.Module, data: Data) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(data.x), data.y).item()


def train(arm: Arm, regime: Regime, seed: int, options: Options) -> Run:
    """Train one seed. Full batch, the loss the next step computes is the full-data loss after this
    one, so it serves as the evaluation (no extra forward)."""
    data, batch_size, eval_every, max_steps = options.data, regime.batch_size, regime.eval_every, options.max_steps
    model = make_model(seed)
    full_batch = batch_size is None
    optimizer = arm.factory(model, full_batch)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y)
    hits: dict[float, int | None] = dict.fromkeys(TARGETS)
    train_seconds = 0.0
    step = 0
    loss_now = math.nan  # the full-data loss at the current weights, when known

    def check(value: float) -> bool:
        """Record the targets met after ``step`` steps; True when the run should stop."""
        for target in TARGETS:
            if hits[target] is None and value <= target:
                hits[target] = step
        return not math.isfinite(value) or (options.early_stop and all(h is not None for h in hits.values()))

    stopped = False
    while step < max_steps and not stopped:
        if full_batch:
            batches: list[Tensor | None] = [None]
        else:
            assert batch_size is not None
            order = torch.randperm(n, generator=generator)
            batches = [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        for index in batches:
            x, y = (data.x, data.y) if index is None else (data.x[index], data.y[index])
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            value = loss.item()
            if full_batch:
                # The loss after `step` steps: evaluate it before stepping further.
                loss_now = value
                if step > 0 and step % eval_every == 0 and check(value):
                    stopped = True
                    break
            optimizer.step(lambda loss=loss: loss)
            train_seconds += time.perf_counter() - start
            step += 1
            loss_now = math.nan
            if not full_batch and step % eval_every == 0:
                loss_now = full_loss(model, data)
                if check(loss_now):
                    stopped = True
                    break
            if step >= max_steps:
                break
    if math.isnan(loss_now):
        loss_now = full_loss(model, data)
        if not stopped:
            check(loss_now)
    counts = list(optimizer.selection_counts) if isinstance(optimizer, DSGD) else None
    return Run(
        seed=seed,
        hits=hits,
        final_loss=loss_now,
        steps=step,
        seconds_per_step=train_seconds / max(step, 1),
        selection_counts=counts,
    )


def run_arm(arm: Arm, regime: Regime, options: Options) -> Result:
    runs: list[Run] = []
    for seed in options.seeds:
        run = train(arm, regime, seed, options)
        runs.append(run)
        hits = " ".join(f"{t}:{'—' if run.hits[t] is None else run.hits[t]}" for t in TARGETS)
        lr = "" if arm.lr is None else f" lr={arm.lr:g}"
        print(
            f"  [{regime.name}] {arm.name}{lr} seed={seed}: {hits} final={run.final_loss:.4f} "
            f"steps={run.steps} {run.seconds_per_step * 1e3:.2f} ms/step",
            file=sys.stderr,
            flush=True,
        )
    return Result(arm, runs)


def sweep(
    name: str, grid: Sequence[float], make: Callable[[float], OptimizerFactory], regime: Regime, options: Options
) -> Result:
    """Every learning rate of ``grid``; the best one's result, with the sweep attached."""
    results = [run_arm(Arm(name, lr, make(lr)), regime, options) for lr in grid]
    best = min(results, key=Result.rank_key)
    edge = None
    if len(grid) > 1 and best.arm.lr == min(grid):
        edge = "lowest"
    elif len(grid) > 1 and best.arm.lr == max(grid):
        edge = "highest"
    return Result(best.arm, best.runs, edge, tuple(results))


# ---------------------------------------------------------------------------------------------- report
def steps_cell(result: Result, target: float) -> str:
    steps = result.reached(target)
    count = f"({len(steps)}/{len(result.runs)})"
    if not steps:
        return f"— {count}"
    spread = statistics.stdev(steps) if len(steps) > 1 else 0.0
    return f"{statistics.fmean(steps):.0f} ± {spread:.0f} {count}"


def loss_cell(result: Result) -> str:
    losses = [run.final_loss for run in result.runs]
    finite = [v for v in losses if math.isfinite(v)]
    text = f"{statistics.fmean(finite):.4f}" if finite else "nan"
    if len(finite) < len(losses):
        text += f" ({len(losses) - len(finite)} diverged)"
    return text


def lr_cell(result: Result) -> str:
    if result.arm.lr is None:
        return ""
    return f"{result.arm.lr:g}" + (f" ({result.edge} of grid)" if result.edge else "")


def counts_cell(result: Result) -> str:
    counts = [run.selection_counts for run in result.runs if run.selection_counts is not None]
    if not counts:
        return ""
    return "[" + ", ".join(str(sum(c[i] for c in counts)) for i in range(len(counts[0]))) + "]"


def ratio_line(regime: Regime, results: Sequence[Result]) -> str:
    low = min(TARGETS)
    adaptive = next(r for r in results if r.arm.name == "adaptive DSGD")
    best_adam = next(r for r in results if r.arm.name == "Adam")
    a, b = adaptive.mean_steps(low), best_adam.mean_steps(low)
    seeds = len(adaptive.runs)
    caveats = [
        f"{r.arm.name} reached {low} on {len(r.reached(low))}/{seeds} seeds (mean over those)"
        for r in (adaptive, best_adam)
        if len(r.reached(low)) < seeds
    ]
    if not (math.isfinite(a) and math.isfinite(b)):
        verdict, ratio = "cannot be computed", "n/a"
    else:
        verdict, ratio = ("met" if a / b <= 2.0 else "NOT met"), f"{a / b:.2f}"
    note = f"; {'; '.join(caveats)}" if caveats else ""
    return (
        f"**{regime.name}**: adaptive DSGD / best Adam (lr={best_adam.arm.lr:g}) mean steps to {low}: "
        f"{_steps(a)} / {_steps(b)} = {ratio} (target ≤ 2: {verdict}){note}"
    )


def _steps(value: float) -> str:
    return f"{value:.0f}" if math.isfinite(value) else "—"


def table(rows: Sequence[tuple[Regime, Result]]) -> list[str]:
    low, high = min(TARGETS), max(TARGETS)
    lines = [
        f"| regime | arm | lr | steps to {high} | steps to {low} | final loss | ms/step | layer selections |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for regime, result in rows:
        ms = statistics.fmean(run.seconds_per_step for run in result.runs) * 1e3
        lines.append(
            f"| {regime.name} | {result.arm.name} | {lr_cell(result)} | {steps_cell(result, high)} | "
            f"{steps_cell(result, low)} | {loss_cell(result)} | {ms:.2f} | {counts_cell(result)} |"
        )
    return lines


def sweep_table(rows: Sequence[tuple[Regime, Result]]) -> list[str]:
    low, high = min(TARGETS), max(TARGETS)
    lines = [
        f"| regime | optimizer | lr | steps to {high} | steps to {low} | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for regime, best in rows:
        for result in best.sweep:
            mark = " ★" if result.arm.lr == best.arm.lr else ""
            lines.append(
                f"| {regime.name} | {result.arm.name} | {result.arm.lr:g}{mark} | {steps_cell(result, high)} | "
                f"{steps_cell(result, low)} | {loss_cell(result)} |"
            )
    return lines


# ---------------------------------------------------------------------------------------------- main
def code_version() -> str:
    """The lightning_dsgd sources this process imported: git commit (``+dirty`` when the package
    differs from it) and a hash of the package's ``.py`` files, so that results can be tied to code."""
    root = Path(lightning_dsgd.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        commit += "+dirty" if changes else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown commit"
    return f"lightning_dsgd {commit}, sources sha256 {digest.hexdigest()[:12]}"


def parse_regime(text: str, eval_every: int | None) -> Regime:
    if text == "full":
        return Regime("full batch", None, eval_every or 1)
    size = int(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"batch size must be positive, got {size}")
    return Regime(f"batch {size}", size, eval_every or MINI_BATCH_EVAL_EVERY)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0..4; --quick: 0 1)")
    parser.add_argument("--regimes", default="full,64", help="comma-separated: 'full' and/or batch sizes")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap per run (default 2000; --quick: 300)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=f"steps between full-data loss checks (default: 1 full batch, {MINI_BATCH_EVAL_EVERY} mini-batch)",
    )
    parser.add_argument("--sgd-grid", type=float, nargs="+", default=None, help="SGD learning rates")
    parser.add_argument("--adam-grid", type=float, nargs="+", default=None, help="Adam learning rates")
    parser.add_argument("--no-early-stop", action="store_true", help="run to --max-steps even after loss 0.1")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 300 steps, 2-point grids")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    parser.add_argument("--out", default=None, help="also write the tables as Markdown to this path")
    args = parser.parse_args(argv)
    if args.eval_every is not None and args.eval_every < 1:
        parser.error("--eval-every must be ≥ 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    version = code_version()  # first: the package may be edited while this runs
    torch.set_num_threads(args.threads)
    options = Options(
        data=load_data(),
        seeds=args.seeds if args.seeds is not None else ([0, 1] if args.quick else list(range(5))),
        max_steps=args.max_steps if args.max_steps is not None else (300 if args.quick else 2000),
        early_stop=not args.no_early_stop,
        sgd_grid=args.sgd_grid or list(QUICK_SGD_GRID if args.quick else SGD_GRID),
        adam_grid=args.adam_grid or list(QUICK_ADAM_GRID if args.quick else ADAM_GRID),
    )
    regimes = [parse_regime(text.strip(), args.eval_every) for text in args.regimes.split(",")]
    started, cpu_started = time.perf_counter(), time.process_time()
    rows: list[tuple[Regime, Result]] = []
    sweeps: list[tuple[Regime, Result]] = []
    ratios: list[str] = []
    for regime in regimes:
        regime_start = time.perf_counter()
        results = [
            run_arm(Arm("certified DSGD", None, certified_dsgd), regime, options),
            run_arm(Arm("adaptive DSGD", None, adaptive_dsgd), regime, options),
            sweep("SGD", options.sgd_grid, sgd, regime, options),
            sweep("Adam", options.adam_grid, adam, regime, options),
        ]
        rows += [(regime, r) for r in results]
        sweeps += [(regime, r) for r in results if r.sweep]
        ratios.append(ratio_line(regime, results))
        print(f"[{regime.name}] done in {time.perf_counter() - regime_start:.0f} s", file=sys.stderr, flush=True)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    header = (
        f"digits (1797 samples), tanh MLP 64-128-128-10, seeds {options.seeds}, max {options.max_steps} steps, "
        f"loss checked every {', '.join(f'{r.eval_every} ({r.name})' for r in regimes)} step(s)"
        f"{'' if options.early_stop else ', no early stop'}; torch {torch.__version__}, {args.threads} thread(s)."
    )
    lines = [
        header,
        "",
        f"Code: {version}.",
        "",
        *table(rows),
        "",
        *[f"- {line}" for line in ratios],
        "",
        "Learning-rate sweeps (★ = chosen):",
        "",
        *sweep_table(sweeps),
        "",
        f"Total: {elapsed:.0f} s wall, {cpu:.0f} s CPU.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
