"""What DSGD buys: training runs of every arm on every task (``bench_tasks``), seeds, learning-rate
sweeps and their summaries.

Arms (each seed starts from the same initial weights in every arm: ``torch.manual_seed(seed)``
before the model is built; mini-batches are drawn by a generator seeded with the seed):

* ``DSGD adaptive``: ``DSGD(model)``, no argument — the default, ``constants="adaptive"`` (every
  layer steps with its own ``η/L_i``; no ``full_batch`` declared, in either regime).
* ``DSGD certified``: ``DSGD(model, constants="data")``, the paper's algorithm (one greedy layer
  per step; certified on the tanh MLPs, adaptive constants elsewhere).
* ``DSGD adaptive, greedy`` / ``random`` / ``cyclic``: the same adaptive constants, one layer per
  step, chosen greedily (the paper's rule), at random or in turn.
* ``DSGD adaptive, momentum 0.9``: ``DSGD(model, constants="adaptive", momentum=0.9)``.
* ``output layer alone``: every parameter below the output layer frozen, the output layer trained
  by ``DSGD(nn.Sequential(head), constants="data")`` (a one-layer chain: its certified constant ``H·‖[x; 1]‖²``).
* ``SGD``, ``Adam``: learning rate swept on a log grid (1–3 steps) on the selection seeds; a grid
  whose best rate lands on an edge is extended past that edge (up to ``max_extend`` points), so the
  best rate is interior. The best rate by mean final training loss is then run on every seed.
* ``Muon``: ``torch.optim.Muon`` on the hidden matrices + AdamW at the task's best Adam rate on the
  rest; the Muon rate swept the same way.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks.bench_common import Device, head_module, make_adam, make_muon, make_sgd
from benchmarks.bench_tasks import Task, accuracy, cross_entropy
from lightning_dsgd import DSGD

Builder = Callable[[nn.Module, Task, int], torch.optim.Optimizer]


@dataclass
class Run:
    seed: int
    curve: list[tuple[int, float, float]]  # (steps taken, training loss, training seconds so far)
    final_loss: float
    val_accuracy: float
    seconds: float
    steps: int
    picks: list[int] | None = None  # DSGD: the layer moved at each step (-1: skipped)
    layer_names: list[str] | None = None

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.final_loss)

    def hit(self, target: float) -> tuple[int, float] | None:
        """(steps, seconds) at the first evaluation with training loss ≤ target."""
        for step, loss, seconds in self.curve:
            if loss <= target:
                return step, seconds
        return None


@dataclass
class ArmResult:
    arm: str
    runs: list[Run]
    lr: float | None = None
    edge: str | None = None
    sweep: dict[float, list[Run]] = field(default_factory=dict)
    note: str = ""

    def final_losses(self) -> list[float]:
        return [r.final_loss for r in self.runs]

    def mean_final(self) -> float:
        values = self.final_losses()
        return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf


@dataclass(frozen=True)
class Plan:
    seeds: list[int]
    selection_seeds: list[int]
    sgd_grid: list[float]
    adam_grid: list[float]
    muon_grid: list[float]
    max_extend: int
    arms: tuple[str, ...] = (
        "DSGD adaptive",
        "DSGD certified",
        "DSGD adaptive, greedy",
        "DSGD adaptive, random",
        "DSGD adaptive, cyclic",
        "DSGD adaptive, momentum 0.9",
        "output layer alone",
    )


# ---------------------------------------------------------------------------------------------- arms
def dsgd_adaptive(model: nn.Module, task: Task, seed: int) -> torch.optim.Optimizer:
    return DSGD(model)  # the default: constants="adaptive", every layer per step


def dsgd_certified(model: nn.Module, task: Task, seed: int) -> torch.optim.Optimizer:
    return DSGD(model, constants="data")


def dsgd_greedy(model: nn.Module, task: Task, seed: int) -> torch.optim.Optimizer:
    return DSGD(model, constants="adaptive", layers_per_step=1)


def dsgd_random(model: nn.Module, task: Task, seed: int) -> torch.optim.Optimizer:
    return DSGD(model, constants="adaptive", selection="random", seed=seed)


def dsgd_cyclic(model: nn.Module, task: Task, seed: int) -> torch.optim.Optimizer:
    return DSGD(model, constants="adaptive", selection="cyclic")


def dsgd_momentum(model: nn.Module, task: Task, seed: int) -> torch.optim.Optimizer:
    return DSGD(model, constants="adaptive", momentum=0.9)


def output_alone(model: nn.Module, task: Task, seed: int) -> torch.optim.Optimizer:
    head = head_module(model)
    keep = {id(p) for p in head.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    return DSGD(nn.Sequential(head), constants="data")


FIXED_ARMS: dict[str, Builder] = {
    "DSGD adaptive": dsgd_adaptive,
    "DSGD certified": dsgd_certified,
    "DSGD adaptive, greedy": dsgd_greedy,
    "DSGD adaptive, random": dsgd_random,
    "DSGD adaptive, cyclic": dsgd_cyclic,
    "DSGD adaptive, momentum 0.9": dsgd_momentum,
    "output layer alone": output_alone,
}


# ---------------------------------------------------------------------------------------------- one run
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) without gradients."""
    total, correct, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), chunk):
            logits = model(x[i : i + chunk])
            yy = y[i : i + chunk]
            count = yy.numel()
            total += cross_entropy(logits, yy).item() * count
            correct += accuracy(logits, yy) * count
            n += count
    return total / n, correct / n


def train(task: Task, build: Builder, seed: int, device: Device) -> Run:
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = build(model, task, seed)
    dsgd = optimizer if isinstance(optimizer, DSGD) else None
    picks: list[int] | None = [] if dsgd is not None else None
    generator = torch.Generator().manual_seed(seed)
    n = len(task.train_y)
    start_loss, _ = evaluate(model, task.eval_x, task.eval_y)
    curve: list[tuple[int, float, float]] = [(0, start_loss, 0.0)]
    limit = max(10.0 * start_loss, 10.0)
    seconds, step, diverged = 0.0, 0, False
    while step < task.steps and not diverged:
        if task.batch_size is None:
            batches: list[torch.Tensor | None] = [None]
        else:
            order = torch.randperm(n, generator=generator).to(task.train_x.device)
            batches = [order[i : i + task.batch_size] for i in range(0, n - task.batch_size + 1, task.batch_size)]
        for index in batches:
            x, y = (task.train_x, task.train_y) if index is None else (task.train_x[index], task.train_y[index])
            begin = device.now()
            optimizer.zero_grad()
            loss = cross_entropy(model(x), y)
            loss.backward()
            if task.full_batch:
                # Full batch, this loss is the training loss after `step` steps: it is the evaluation.
                value = loss.item()
                if step > 0 and step % task.eval_every == 0:
                    curve.append((step, value, seconds))
                if not value < limit:  # inf/NaN included
                    diverged = True
                    break
            if dsgd is not None and dsgd.full_batch:
                optimizer.step(loss=loss)  # type: ignore[call-arg]
            else:
                optimizer.step()
            seconds += device.now() - begin
            step += 1
            if picks is not None:
                record = dsgd.last_step  # type: ignore[union-attr]
                picks.append(-1 if record is None or record.layer is None else record.layer)
            if not task.full_batch and (step % task.eval_every == 0 or step == task.steps):
                value, _ = evaluate(model, task.eval_x, task.eval_y)
                curve.append((step, value, seconds))
                if not value < limit:
                    diverged = True
                    break
            if step >= task.steps:
                break
    final, _ = evaluate(model, task.eval_x, task.eval_y)
    if task.full_batch and not diverged:
        curve.append((step, final, seconds))
    if diverged or not math.isfinite(final):
        final = math.inf
    _, val_acc = evaluate(model, task.val_x, task.val_y)
    return Run(
        seed=seed,
        curve=curve,
        final_loss=final,
        val_accuracy=val_acc,
        seconds=seconds,
        steps=step,
        picks=picks,
        layer_names=None if dsgd is None else dsgd.layer_names,
    )


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_seeds(
    task: Task, arm: str, build: Builder, seeds: Sequence[int], device: Device, lr: float | None = None
) -> list[Run]:
    runs = []
    for seed in seeds:
        run = train(task, build, seed, device)
        runs.append(run)
        rate = "" if lr is None else f" lr={lr:g}"
        log(
            f"  [{task.name}] {arm}{rate} seed {seed}: final {run.final_loss:.4f}, val acc {run.val_accuracy:.3f}, "
            f"{run.seconds / max(run.steps, 1) * 1e3:.2f} ms/step"
        )
    return runs


# ---------------------------------------------------------------------------------------------- sweeps
def neighbour(lr: float, up: bool) -> float:
    """The next rate on the 1-3-10 log grid."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    if up:
        return (3.0 if mantissa < 2 else 10.0) * 10**exponent
    return (1.0 if mantissa > 2 else 0.3) * 10**exponent


def _score(runs: list[Run]) -> float:
    values = [r.final_loss for r in runs]
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf


def sweep(
    task: Task, arm: str, make: Callable[[float], Builder], grid: Sequence[float], plan: Plan, device: Device
) -> ArmResult:
    tried: dict[float, list[Run]] = {}
    for lr in grid:
        tried[lr] = run_seeds(task, arm, make(lr), plan.selection_seeds, device, lr)
    extended = 0
    while True:
        best = min(sorted(tried), key=lambda lr: _score(tried[lr]))
        rates = sorted(tried)
        edge = "lowest" if best == rates[0] else "highest" if best == rates[-1] else None
        if edge is None or extended >= plan.max_extend or not math.isfinite(_score(tried[best])):
            break
        lr = neighbour(best, up=edge == "highest")
        tried[lr] = run_seeds(task, arm, make(lr), plan.selection_seeds, device, lr)
        extended += 1
    others = [s for s in plan.seeds if s not in plan.selection_seeds]
    runs = list(tried[best]) + run_seeds(task, arm, make(best), others, device, best)
    runs.sort(key=lambda r: plan.seeds.index(r.seed) if r.seed in plan.seeds else r.seed)
    return ArmResult(arm, runs, lr=best, edge=edge, sweep=dict(sorted(tried.items())))


PARTS = ("dsgd", "choice", "sgd", "adam+muon")
CHOICE_ARMS = ("DSGD adaptive, greedy", "DSGD adaptive, random", "DSGD adaptive, cyclic")


def run_part(task: Task, part: str, plan: Plan, device: Device) -> list[ArmResult]:
    """One independent share of a task's arms (so that shares can run in parallel processes): the
    DSGD arms with fixed settings (split in two: the layer-choice arms apart), the SGD sweep, or the
    Adam sweep followed by Muon (which uses Adam's rate)."""
    if part in ("dsgd", "choice"):
        arms = [arm for arm in plan.arms if (arm in CHOICE_ARMS) == (part == "choice")]
        if not task.rigorous:  # outside the rigorous class constants="data" is the adaptive default
            arms = [arm for arm in arms if arm != "DSGD certified"]
        return [ArmResult(arm, run_seeds(task, arm, FIXED_ARMS[arm], plan.seeds, device)) for arm in arms]

    def sgd(lr: float) -> Builder:
        return lambda model, _task, _seed: make_sgd(model, lr)

    def adam(lr: float) -> Builder:
        return lambda model, _task, _seed: make_adam(model, lr)

    if part == "sgd":
        return [sweep(task, "SGD", sgd, plan.sgd_grid, plan, device)]
    if part != "adam+muon":
        raise ValueError(f"unknown part {part!r}")
    best_adam = sweep(task, "Adam", adam, plan.adam_grid, plan, device)
    adamw_lr = best_adam.lr or 1e-3

    def muon(lr: float) -> Builder:
        return lambda model, _task, _seed: make_muon(model, lr, adamw_lr)

    result = sweep(task, "Muon", muon, plan.muon_grid, plan, device)
    result.note = f"AdamW lr {adamw_lr:g} on the rest"
    return [best_adam, result]


# ---------------------------------------------------------------------------------------------- summaries
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def selection_fractions(result: ArmResult) -> list[float] | None:
    """Share of the steps that moved each layer, over every seed."""
    runs = [r for r in result.runs if r.picks]
    if not runs:
        return None
    n_layers = len(runs[0].layer_names or [])
    counts = [0] * n_layers
    total = 0
    for run in runs:
        for pick in run.picks or []:
            total += 1
            if 0 <= pick < n_layers:
                counts[pick] += 1
    return [c / max(total, 1) for c in counts]


def run_length(picks: Sequence[int], names: Sequence[str] = (), limit: int = 12) -> str:
    """``head×14 fc×3 …``: the first ``limit`` runs of the same layer (named when ``names`` are given)."""
    out: list[str] = []
    i = 0
    while i < len(picks) and len(out) < limit:
        j = i
        while j < len(picks) and picks[j] == picks[i]:
            j += 1
        label = "skip" if picks[i] < 0 else (names[picks[i]] if picks[i] < len(names) else str(picks[i]))
        out.append(f"{label}×{j - i}")
        i = j
    if i < len(picks):
        out.append("…")
    return " ".join(out)
