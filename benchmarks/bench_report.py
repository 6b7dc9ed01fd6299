"""The benchmark page (``docs/benchmarks.md``) and its plots, written from the harness's results."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.bench_cost import GPT_PARTS, GPT_PATHS, Config, GPTConfig, Scaling, Timing
from benchmarks.bench_profile import Profile
from benchmarks.bench_quality import ArmResult, Run, mean_std, run_length, selection_fractions
from benchmarks.bench_tasks import Task

PEER_ARMS = ("SGD", "Adam", "Muon")


def ms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"
    value = seconds * 1e3
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return "—"
    return f"{a / b:.2f}×"


def loss_text(value: float) -> str:
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.1e}"


# ---------------------------------------------------------------------------------------------- cost
def cost_table(config: Config, timing: Timing, lightning: dict[str, float]) -> list[str]:
    arms = list(timing.step)
    sgd_step, sgd_whole = timing.step.get("SGD", math.nan), timing.whole.get("SGD", math.nan)
    muon_step = timing.step.get("Muon", math.nan)
    sgd_light = lightning.get("SGD", math.nan)
    lines = [
        "| optimizer | step alone (ms) | × SGD | × Muon | whole step (ms) | × SGD | Lightning step (ms) | × SGD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in arms:
        light = lightning.get(arm, math.nan)
        lines.append(
            f"| {arm} | {ms(timing.step[arm])} | {ratio(timing.step[arm], sgd_step)} | "
            f"{ratio(timing.step[arm], muon_step)} | {ms(timing.whole[arm])} | {ratio(timing.whole[arm], sgd_whole)} | "
            f"{ms(light)} | {ratio(light, sgd_light)} |"
        )
    return lines


def gpt_table(timings: dict[int, Timing]) -> list[str]:
    """One row per width: Muon+AdamW's step, then each spectral DSGD arm's step and its ratio."""
    arms = list(GPT_PATHS)
    lines = [
        "| width | Muon+AdamW step (ms) | " + " | ".join(f"{arm} (ms) | × Muon" for arm in arms) + " |",
        "|---:|---:|" + "---:|---:|" * len(arms),
    ]
    for width, timing in timings.items():
        muon = timing.step.get("Muon", math.nan)
        cells = [f"{ms(timing.step.get(a, math.nan))} | {ratio(timing.step.get(a, math.nan), muon)}" for a in arms]
        lines.append(f"| {width} | {ms(muon)} | " + " | ".join(cells) + " |")
    return lines


def gpt_parts_table(timings: dict[int, Timing]) -> list[str]:
    """One row per width: where the matmul path's step goes, each part ÷ Muon+AdamW's whole step."""
    rows = [(w, t) for w, t in timings.items() if all(p in t.step for p in GPT_PARTS)]
    if not rows:
        return []
    head = ["Muon+AdamW step", "Muon's Newton–Schulz", "DSGD matmul step", "iteration", "certificate", "rest"]
    lines = [
        "| width | " + " | ".join(f"{h} (ms) | ÷ Muon+AdamW" for h in head) + " |",
        "|---:|" + "---:|---:|" * len(head),
    ]
    for width, timing in rows:
        muon, whole = timing.step.get("Muon", math.nan), timing.step.get("DSGD spectral matmul", math.nan)
        newton, iteration, certificate = (timing.step[p] for p in GPT_PARTS)
        values = [muon, newton, whole, iteration, certificate, whole - iteration - certificate]
        lines.append(f"| {width} | " + " | ".join(f"{ms(v)} | {ratio(v, muon)}" for v in values) + " |")
    return lines


def gpt_section(config: GPTConfig, timings: dict[int, Timing], device: str, threads: int) -> list[str]:
    """The GPT-shaped cost section of the page."""
    lines = [
        "## GPT-shaped model: the optimizer step against Muon",
        "",
        f"{config.describe()}, w = {', '.join(map(str, timings))}; {device}, {threads} thread(s). "
        "`optimizer.step()` alone on one batch's gradients, arms interleaved call by call (the forward that "
        "DSGD's data constants need runs untimed before each step). Muon+AdamW: `torch.optim.Muon` (5 bfloat16 "
        "Newton–Schulz steps) on the hidden matrices, AdamW on embeddings, LayerNorms, biases and head. Spectral "
        "DSGD scores every block (Linear layers spectral, embeddings by rows, LayerNorms ℓ∞) and, the model "
        "being outside the rigorous class (estimated constants), moves every block: "
        "*DSGD spectral* takes each block's path from the measured crossover (`lightning_dsgd.polar.use_polar`), "
        "*exact* forces the SVD path (one batched `svd` per shape group gives every score and direction), "
        "*matmul* forces the "
        'certified Polar-Express path (`SpectralGeometry(polar="always")`, theory page).',
        "",
        *gpt_table(timings),
        "",
    ]
    parts = gpt_parts_table(timings)
    if parts:
        lines += [
            "Where the matmul path's step goes, timed in the same interleaved run: Muon's Newton–Schulz steps "
            "alone on the hidden matrices' gradients (`torch.optim._muon._zeropower_via_newtonschulz`, Muon's "
            "settings); DSGD's *iteration* alone (`polar_iteration`: six bfloat16 Polar-Express stages on "
            "`G/‖G‖_F`, on the blocks its first step handed to `polar_directions`) and its *certificate* alone "
            "(`certify_iteration` on those iterates: the Gram `X Xᵀ` with its rounding bound and a Cholesky "
            "test of `t I − X Xᵀ`); *rest*: the matmul step minus both (norms, ⟨G, D⟩, the division, "
            "constants, scores, the update). Each ratio is that part ÷ Muon+AdamW's whole step: a DSGD step at "
            "or below Muon+AdamW's needs iteration + certificate + rest ≤ 1.00×.",
            "",
            *parts,
            "",
            *gpt_floor(timings),
        ]
    return lines


def gpt_floor(timings: dict[int, Timing]) -> list[str]:
    """Per width: the step DSGD would take with a free certificate and Muon's own overhead,
    iteration + (Muon+AdamW step − Muon's Newton–Schulz), ÷ Muon+AdamW's step."""
    floors = []
    for width, timing in timings.items():
        if all(p in timing.step for p in GPT_PARTS) and "Muon" in timing.step:
            muon, newton, iteration = timing.step["Muon"], timing.step[GPT_PARTS[0]], timing.step[GPT_PARTS[1]]
            floors.append(f"{ratio(iteration + muon - newton, muon)} at width {width}")
    if not floors:
        return []
    return [
        "Floor: with a free certificate and no more overhead than Muon+AdamW has beside its Newton–Schulz steps, "
        f"DSGD's step would be iteration + that overhead: {', '.join(floors)} of Muon+AdamW's step. Six "
        "Polar-Express stages cost what Muon's five do per stage (our blocks carry the bias column); five stages "
        "lose the 0.95 tightness of the score (theory page).",
        "",
    ]


def picks_text(picks: dict[str, list[int]]) -> str:
    parts = [f"{arm.removeprefix('DSGD ')} {'/'.join(map(str, counts))}" for arm, counts in picks.items()]
    return "; ".join(parts) or "—"


def scaling_table(scaling: Scaling) -> list[str]:
    arms: list[str] = []
    for timing in scaling.timings.values():
        for arm in list(timing.step) + list(timing.skipped):
            if arm not in arms:
                arms.append(arm)
    header = f"| {scaling.dimension} | " + " | ".join(arms) + " |"
    lines = [header, "|---:|" + "---:|" * len(arms)]
    for value in scaling.values:
        timing = scaling.timings.get(value)
        if timing is None:
            continue
        sgd = timing.whole.get("SGD", math.nan)
        cells = []
        for arm in arms:
            if arm in timing.skipped:
                cells.append(timing.skipped[arm])
            elif arm in timing.step:
                note = "" if timing.samples.get(arm, 2) > 1 else " (1 sample)"
                whole = timing.whole[arm]
                rel = "" if arm == "SGD" else f" ({ratio(whole, sgd)})"
                cells.append(f"{ms(timing.step[arm])} / {ms(whole)}{rel}{note}")
            else:
                cells.append("")
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return lines


def figure(rows: int, cols: int, width: float, height: float) -> tuple[Any, Any]:
    """``(fig, axes)``: a ``rows × cols`` grid of ``width × height``-inch panels (Agg: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def task_panels(count: int, height: float) -> tuple[Any, Any]:
    """One panel per task, three to a row; the panels left over are blank."""
    cols = min(3, count)
    fig, axes = figure(math.ceil(count / cols), cols, 3.4, height)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, axes


def save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_scaling(scalings: Sequence[Scaling], path: str) -> None:
    import matplotlib.ticker

    fig, axes = figure(2, len(scalings), 3.2, 2.7)
    for col, scaling in enumerate(scalings):
        arms: list[str] = []
        for timing in scaling.timings.values():
            arms += [a for a in timing.step if a not in arms]
        for arm in arms:
            xs = [v for v in scaling.values if v in scaling.timings and arm in scaling.timings[v].step]
            step = [scaling.timings[v].step[arm] * 1e3 for v in xs]
            rel = [scaling.timings[v].whole[arm] / scaling.timings[v].whole["SGD"] for v in xs]
            style = "-" if arm.startswith("DSGD") else "--"
            label = arm.replace(" data", "")
            axes[0][col].plot(xs, step, style, marker="o", ms=3, label=label)
            axes[1][col].plot(xs, rel, style, marker="o", ms=3, label=label)
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_yscale("log")
            axes[row][col].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axes[row][col].grid(alpha=0.3)
        axes[0][col].set_title(f"vs {scaling.dimension}", fontsize=9)
        axes[1][col].set_xlabel(scaling.dimension, fontsize=8)
    axes[0][0].set_ylabel("optimizer step (ms)", fontsize=8)
    axes[1][0].set_ylabel("whole step / SGD's", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    save(fig, path)


# ---------------------------------------------------------------------------------------------- profile
def profile_section(profile: Profile) -> list[str]:
    variants = list(profile.variants.values())
    names = list(variants[0].components)
    lines = [
        'Spectral DSGD (`DSGD(model, constants="data")`) on the tanh MLP '
        f"{'-'.join(map(str, profile.widths))}, batch "
        f"{profile.batch}, on fresh batches: greedy for {variants[0].steps} steps, and (same initial weights) cyclic "
        "for one step per layer, so that every block — the wide hidden ones included — is updated once. The plain "
        "rows are the package as shipped: blocks whose gradient has rank ≤ the batch "
        f"({profile.batch}) well below their size are scored and stepped through a randomized range finder "
        "(exact when the rank bound holds; the decrease guarantee is that of the applied step in any case), and "
        "σ_max of a moved weight follows by the triangle inequality until it has grown 2% "
        "(`lightning_dsgd.norm_bounds`). The *exact SVDs (before)* rows switch both off on that optimizer: full "
        "SVDs of every block and σ_max recomputed after every move. Each cell: ms per step (share of the step). "
        "Zero_grad + forward + backward: "
        f"{ms(profile.backward_seconds)} ms; Muon + AdamW step on the same model: "
        f"{ms(profile.muon_step_seconds)} ms (medians).",
        "",
        "| variant | " + " | ".join(names) + " | median `DSGD.step` (ms) | × Muon | layers moved |",
        "|---|" + "---:|" * (len(names) + 2) + "---|",
    ]
    for v in variants:
        total = sum(sec for _, sec in v.components.values())
        cells = []
        for name in names:
            _, seconds = v.components.get(name, (0, 0.0))
            share = 100 * seconds / total if total > 0 else math.nan
            cells.append(f"{ms(seconds / v.steps)} ({share:.0f}%)")
        lines.append(
            f"| {v.selection} | " + " | ".join(cells) + f" | {ms(v.step_seconds)} | "
            f"{ratio(v.step_seconds, profile.muon_step_seconds)} | {'/'.join(map(str, v.picks))} |"
        )
    if profile.top_ops:
        lines += [
            "",
            "Top operators of the greedy whole step (torch.profiler, self time):",
            "",
            "| operator | ms per step | calls per step |",
        ]
        lines.append("|---|---:|---:|")
        lines += [f"| `{name}` | {ms(seconds)} | {calls} |" for name, seconds, calls in profile.top_ops]
    base = profile.kernels.get("svdvals (exact nuclear norm)", math.nan)
    lines += [
        "",
        f"One hidden block ({profile.widths[1]}×{profile.widths[2] + 1} gradient, rank ≤ {profile.sketch_rank}):",
        "",
        "| method | ms | × svdvals |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms(seconds)} | {ratio(seconds, base)} |" for name, seconds in profile.kernels.items()]
    if any(name.startswith("sketched") for name in profile.kernels):
        error = f"{profile.sketch_error:.1e}"
        lines += ["", f"Relative error of the sketched nuclear norm against float64 `svdvals`: {error}."]
    return lines


# ---------------------------------------------------------------------------------------------- quality
@dataclass
class TaskResult:
    task: Task
    results: list[ArmResult]

    def arm(self, name: str) -> ArmResult | None:
        return next((r for r in self.results if r.arm == name), None)


def reached(result: ArmResult, target: float) -> list[tuple[int, float]]:
    return [h for run in result.runs if (h := run.hit(target)) is not None]


def hit_cell(result: ArmResult, target: float, index: int) -> str:
    hits = reached(result, target)
    count = f" ({len(hits)}/{len(result.runs)})" if len(hits) < len(result.runs) else ""
    if not hits:
        return f"—{count}"
    mean, std = mean_std([h[index] for h in hits])
    if index == 0:
        return f"{mean:.0f} ± {std:.0f}{count}"
    return f"{mean:.2f} ± {std:.2f}{count}"


def final_cell(result: ArmResult) -> str:
    values = result.final_losses()
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    mean, std = mean_std(finite)
    text = f"{loss_text(mean)} ± {loss_text(std)}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} diverged)"
    return text


def acc_cell(result: ArmResult) -> str:
    mean, std = mean_std([r.val_accuracy for r in result.runs])
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def lr_cell(result: ArmResult) -> str:
    if result.lr is None:
        return ""
    text = f"{result.lr:g}"
    if result.edge:
        text += f" ({result.edge} tried)"
    return text


def ms_per_step(result: ArmResult) -> float:
    return statistics.fmean(r.seconds / max(r.steps, 1) for r in result.runs)


def quality_table(entry: TaskResult) -> list[str]:
    task = entry.task
    low, high = min(task.targets), max(task.targets)
    lines = [
        f"| arm | lr | final train loss | val. accuracy (%) | steps to {high} | steps to {low} | "
        f"seconds to {high} | seconds to {low} | ms/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in entry.results:
        name = result.arm + (f" ({result.note})" if result.note else "")
        lines.append(
            f"| {name} | {lr_cell(result)} | {final_cell(result)} | {acc_cell(result)} | {hit_cell(result, high, 0)} | "
            f"{hit_cell(result, low, 0)} | {hit_cell(result, high, 1)} | {hit_cell(result, low, 1)} | "
            f"{ms(ms_per_step(result))} |"
        )
    return lines


def sweep_lines(entry: TaskResult) -> list[str]:
    lines = []
    for result in entry.results:
        if not result.sweep:
            continue
        cells = []
        for lr, runs in result.sweep.items():
            values = [r.final_loss for r in runs]
            mean = statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf
            mark = "**" if lr == result.lr else ""
            cells.append(f"{mark}{lr:g}: {loss_text(mean)}{mark}")
        lines.append(f"- {result.arm}: " + ", ".join(cells))
    return lines


def selection_lines(entry: TaskResult) -> list[str]:
    lines = []
    for name in SELECTED:
        result = entry.arm(name)
        if result is None:
            continue
        shares = selection_fractions(result)
        runs = [r for r in result.runs if r.picks]
        if shares is None or not runs:
            continue
        names = runs[0].layer_names or []
        share_text = ", ".join(f"`{n}` {100 * s:.0f}%" for n, s in zip(names, shares, strict=False) if s > 0.0005)
        lines.append(
            f"- {name}: {share_text or 'none'}; seed {runs[0].seed} order: `{run_length(runs[0].picks or [], names)}`"
        )
    return lines


def _curve_stats(runs: Sequence[Run]) -> tuple[list[int], list[float], list[float], list[float], list[float]]:
    """Steps, and per step the median / min / max training loss and median seconds over seeds."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for step, loss, seconds in run.curve:
            by_step.setdefault(step, []).append((loss, seconds))
    steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
    med, low, high, secs = [], [], [], []
    for s in steps:
        losses = [v[0] for v in by_step[s]]
        med.append(statistics.median(losses))
        low.append(min(losses))
        high.append(max(losses))
        secs.append(statistics.median(v[1] for v in by_step[s]))
    return steps, med, low, high, secs


PLOTTED = ("DSGD adaptive", "DSGD certified", "DSGD adaptive, greedy", "output layer alone", *PEER_ARMS)
SELECTED = ("DSGD certified", "DSGD adaptive, greedy")  # one layer per step: whose choices are shown


def plot_quality(entries: Sequence[TaskResult], path: str, against: str) -> None:
    """Training loss (median over seeds, min–max band) against steps or seconds, one panel per task."""
    fig, axes = task_panels(len(entries), 2.8)
    for ax, entry in zip(axes.flat, entries, strict=False):
        for name in PLOTTED:
            result = entry.arm(name)
            if result is None:
                continue
            steps, med, low, high, secs = _curve_stats(result.runs)
            xs = steps if against == "steps" else secs
            style = "-" if name.startswith("DSGD") else ":" if name == "output layer alone" else "--"
            label = name + (f" {result.lr:g}" if result.lr is not None else "")
            floor = 1e-5
            (line,) = ax.plot(xs, [max(v, floor) for v in med], style, lw=1.2, label=label)
            ax.fill_between(
                xs, [max(v, floor) for v in low], [max(v, floor) for v in high], color=line.get_color(), alpha=0.12
            )
        ax.set_yscale("log")
        ax.set_title(entry.task.title, fontsize=8)
        ax.set_xlabel("steps" if against == "steps" else "training seconds", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5)
    axes[0][0].set_ylabel("training loss", fontsize=7)
    save(fig, path)


def plot_selection(entries: Sequence[TaskResult], path: str) -> None:
    """Share of steps per layer for the one-layer arms of ``SELECTED``, one panel per task."""
    fig, axes = task_panels(len(entries), 2.4)
    for ax, entry in zip(axes.flat, entries, strict=False):
        width = 0.4
        names: list[str] = []
        for k, arm in enumerate(SELECTED):
            result = entry.arm(arm)
            shares = None if result is None else selection_fractions(result)
            if result is None or shares is None:
                continue
            names = next((r.layer_names for r in result.runs if r.layer_names), []) or []
            ax.bar([i + (k - 0.5) * width for i in range(len(shares))], shares, width, label=arm.replace("DSGD ", ""))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n[-14:] for n in names], rotation=60, ha="right", fontsize=5)
        ax.set_title(entry.task.title, fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("share of steps", fontsize=7)
    save(fig, path)


# ---------------------------------------------------------------------------------------------- reading
def rank_key(result: ArmResult, targets: Sequence[float]) -> tuple[float, ...]:
    """Smaller is better: more seeds at the low target, fewer steps to it, then the high target,
    then the lower mean final loss."""
    low, high = min(targets), max(targets)

    def mean_steps(target: float) -> float:
        hits = reached(result, target)
        return statistics.fmean(h[0] for h in hits) if hits else math.inf

    return (
        -len(reached(result, low)),
        mean_steps(low),
        -len(reached(result, high)),
        mean_steps(high),
        result.mean_final(),
    )


def best_peer(entry: TaskResult) -> ArmResult | None:
    peers = [r for r in entry.results if r.arm in PEER_ARMS]
    return min(peers, key=lambda r: rank_key(r, entry.task.targets)) if peers else None


def _target_stats(result: ArmResult, target: float) -> tuple[int, float, float]:
    """(seeds reaching ``target``, their mean steps, their mean seconds)."""
    hits = reached(result, target)
    if not hits:
        return 0, math.inf, math.inf
    return len(hits), statistics.fmean(h[0] for h in hits), statistics.fmean(h[1] for h in hits)


def _final_text(result: ArmResult) -> str:
    values = result.final_losses()
    finite = [v for v in values if math.isfinite(v)]
    text = f"final {loss_text(statistics.fmean(finite))}" if finite else "final: diverged"
    if finite and len(finite) < len(values):
        text += f" ({len(values) - len(finite)}/{len(values)} seeds diverged, mean of the others)"
    return text


def _robust_mean(result: ArmResult) -> float:
    """Mean final loss, infinite when any seed diverged."""
    return result.mean_final()


def _loss_or_div(result: ArmResult) -> str:
    values = result.final_losses()
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) == len(values):
        return loss_text(statistics.fmean(values))
    if not finite:
        return f"diverged on {len(values)}/{len(values)} seeds"
    return f"diverged on {len(values) - len(finite)}/{len(values)} seeds (others {loss_text(statistics.fmean(finite))})"


def _finite_mean(result: ArmResult) -> float:
    finite = [v for v in result.final_losses() if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.inf


def _against(result: ArmResult, peer: ArmResult, task: Task) -> str:
    """How ``result`` compares with ``peer``: steps and seconds to the low target, final loss."""
    low = min(task.targets)
    n, steps, seconds = _target_stats(result, low)
    pn, psteps, pseconds = _target_stats(peer, low)
    seeds = len(result.runs)
    parts = []
    if n == 0:
        parts.append(f"never reaches {low}")
    else:
        where = f"reaches {low}" + (f" on {n}/{seeds} seeds" if n < seeds else "")
        if pn:
            close = abs(steps - psteps) <= task.eval_every
            step_word = "as fast in steps" if close else ("faster in steps" if steps < psteps else "slower in steps")
            parts.append(
                f"{where} in {steps:.0f} steps ({step_word}: {steps / psteps:.2f}×) and {seconds:.2f} s "
                f"({seconds / pseconds:.2f}× the peer's seconds)"
            )
        else:
            parts.append(f"{where} in {steps:.0f} steps / {seconds:.2f} s (the peer never does)")
    mine, theirs = _finite_mean(result), _finite_mean(peer)
    if math.isfinite(mine) and math.isfinite(theirs) and theirs > 0:
        word = "lower" if mine < 0.8 * theirs else "higher" if mine > 1.25 * theirs else "about the same"
        parts.append(f"{_final_text(result)}, {word} than the peer's")
    else:
        parts.append(_final_text(result))
    return ", ".join(parts)


def _verdict(result: ArmResult, peer: ArmResult, task: Task) -> str:
    """'ahead', 'behind' or 'mixed' against the peer on (steps to the low target, final loss)."""
    low = min(task.targets)
    n, steps, seconds = _target_stats(result, low)
    pn, psteps, pseconds = _target_stats(peer, low)
    if n < pn or (n == pn == 0 and _finite_mean(result) > _finite_mean(peer)):
        return "behind"
    if n > pn:
        return "ahead"
    mine, theirs = _finite_mean(result), _finite_mean(peer)
    steps_better = steps <= psteps + task.eval_every
    loss_better = mine <= 1.25 * theirs
    diverged = any(r.diverged for r in result.runs)
    if steps_better and loss_better and not diverged:
        return "ahead or level in steps" + ("" if seconds <= pseconds else ", behind in seconds")
    if not steps_better and not loss_better:
        return "behind"
    return "mixed"


def _shares(result: ArmResult | None) -> str:
    if result is None:
        return ""
    shares = selection_fractions(result)
    runs = [r for r in result.runs if r.layer_names]
    if not shares or not runs:
        return ""
    names = runs[0].layer_names or []
    top = sorted(zip(names, shares, strict=False), key=lambda p: -p[1])[:3]
    return ", ".join(f"`{n}` {100 * v:.0f}%" for n, v in top if v > 0)


def _steps_text(result: ArmResult, target: float) -> str:
    n, steps, _ = _target_stats(result, target)
    if n == 0:
        return "never"
    return f"{steps:.0f}" + (f" ({n}/{len(result.runs)})" if n < len(result.runs) else "")


def _choice_word(entry: TaskResult) -> str | None:
    """Whether greedy choice pays against random and cyclic at the same adaptive constants."""
    arms = [entry.arm(n) for n in ("DSGD adaptive, greedy", "DSGD adaptive, random", "DSGD adaptive, cyclic")]
    if any(a is None for a in arms):
        return None
    greedy, random_, cyclic = arms  # type: ignore[misc]
    low = min(entry.task.targets)
    key = {a.arm: rank_key(a, entry.task.targets) for a in arms}  # type: ignore[union-attr]
    best = min(key, key=key.get)  # type: ignore[arg-type]
    g, others = _target_stats(greedy, low), [_target_stats(a, low) for a in (random_, cyclic)]  # type: ignore[arg-type]
    other_steps = min(o[1] for o in others)
    if g[0] > max(o[0] for o in others) or (best == greedy.arm and g[1] < 0.8 * other_steps):  # type: ignore[union-attr]
        return "the greedy choice pays"
    if best != greedy.arm and g[1] > 1.25 * other_steps:  # type: ignore[union-attr]
        return "the greedy choice does not pay"
    return "the layer choice makes little difference"


def _choice_lines(entry: TaskResult) -> list[str]:
    """Greedy against random and cyclic choice at the same adaptive constants (one layer per step),
    and one layer per step against every layer: where the greedy choice pays."""
    word = _choice_word(entry)
    if word is None:
        return []
    greedy, random_, cyclic = (
        entry.arm(n) for n in ("DSGD adaptive, greedy", "DSGD adaptive, random", "DSGD adaptive, cyclic")
    )
    low = min(entry.task.targets)
    lines = [
        f"  - Layer choice at the same adaptive constants, one layer per step — steps to {low}: greedy "
        f"{_steps_text(greedy, low)}, random {_steps_text(random_, low)}, cyclic {_steps_text(cyclic, low)}; "  # type: ignore[arg-type]
        f"final loss greedy {_loss_or_div(greedy)}, random {_loss_or_div(random_)}, cyclic "  # type: ignore[arg-type]
        f"{_loss_or_div(cyclic)} — {word}."  # type: ignore[arg-type]
    ]
    every = entry.arm("DSGD adaptive")
    if every is not None:
        lines.append(
            f"  - Every layer per step (`DSGD adaptive`) against the greedy one: steps to {low} "
            f"{_steps_text(every, low)} against {_steps_text(greedy, low)}."  # type: ignore[arg-type]
        )
    return lines


def ahead_behind(what: str, ahead: Sequence[str], behind: Sequence[str], behind_word: str = "behind") -> str:
    """``- what: ahead on …; behind on …`` (the tasks by name)."""
    return f"- {what}: ahead on {', '.join(ahead) or 'no task'}; {behind_word} on {', '.join(behind) or 'no task'}"


def summary_lines(entries: Sequence[TaskResult]) -> list[str]:
    """The decisions the quality section supports, counted over every task and seed."""
    rows, misses, runs, diverged = 0, [], 0, 0
    for entry in entries:
        mine, adam = entry.arm("DSGD adaptive"), entry.arm("Adam")
        if mine is None or adam is None:
            continue
        runs += len(mine.runs)
        diverged += sum(r.diverged for r in mine.runs)
        for target in entry.task.targets:
            n, steps, _ = _target_stats(mine, target)
            an, asteps, _ = _target_stats(adam, target)
            if n == an == 0:
                continue  # neither reaches it: nothing to compare
            rows += 1
            if n < an or (n and an and steps > 1.5 * asteps):
                ratio = f"{steps / asteps:.2f}×" if n and an else f"{n}/{len(mine.runs)} seeds reach it"
                misses.append(f"{entry.task.name} to {target:g} ({ratio})")
    lines = []
    if rows:
        lines.append(
            f"- `DSGD(model)` (adaptive, every layer) within 1.5× best-tuned Adam's steps: {rows - len(misses)} of "
            f"{rows} (task, target) pairs"
            + (f"; misses: {', '.join(misses)}" if misses else "")
            + f". Diverged: {diverged} of {runs} runs."
        )
    certified = [(e, e.arm("DSGD certified")) for e in entries if e.arm("DSGD certified") is not None]
    if certified:
        reach = [e.task.name for e, c in certified if _target_stats(c, min(e.task.targets))[0] == len(c.runs)]  # type: ignore[arg-type]
        adaptive = [
            e.task.name
            for e, _ in certified
            if (a := e.arm("DSGD adaptive")) is not None and _target_stats(a, min(e.task.targets))[0] == len(a.runs)
        ]
        lines.append(
            "- Defaults: `DSGD(model)` is the adaptive arm. The paper's certified algorithm, one argument away "
            f'(`constants="data"`, every step certified), reaches the low target on every seed on {len(reach)} of '
            f"{len(certified)} rigorous tasks ({', '.join(reach) or 'none'}); the default does on {len(adaptive)} of "
            f"them ({', '.join(adaptive) or 'none'})."
        )
    words: dict[str, list[str]] = {}
    for entry in entries:
        word = _choice_word(entry)
        if word is not None:
            words.setdefault(word, []).append(entry.task.name)
    if words:
        lines.append(
            "- Greedy against random / cyclic choice at the same adaptive constants, one layer per step: "
            + "; ".join(f"{word} on {', '.join(names)}" for word, names in words.items())
            + "."
        )
    faster, slower = [], []
    for entry in entries:
        every, greedy = entry.arm("DSGD adaptive"), entry.arm("DSGD adaptive, greedy")
        if every is None or greedy is None:
            continue
        (faster if rank_key(every, entry.task.targets) < rank_key(greedy, entry.task.targets) else slower).append(
            entry.task.name
        )
    if faster or slower:
        lines.append(ahead_behind("Every layer per step against the greedy layer", faster, slower) + ".")
    ahead, behind, broke = [], [], 0
    for entry in entries:
        plain, heavy = entry.arm("DSGD adaptive"), entry.arm("DSGD adaptive, momentum 0.9")
        if plain is None or heavy is None:
            continue
        broke += sum(r.diverged for r in heavy.runs)
        better = rank_key(heavy, entry.task.targets) < rank_key(plain, entry.task.targets)
        safe = not any(r.diverged for r in heavy.runs)
        (ahead if better and safe else behind).append(entry.task.name)
    if ahead or behind:
        lines.append(
            ahead_behind("Momentum 0.9 against none (both every layer)", ahead, behind, "behind (or diverging)")
            + f"; diverged runs {broke}."
        )
    return lines


def _seconds(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "—"


def fastest_rate(result: ArmResult, target: float) -> tuple[float, float, list[int]] | None:
    """Of a swept arm's rates, the one whose selection seeds all reach ``target`` in the fewest mean
    steps: ``(lr, mean steps, seeds)``."""
    best = None
    for lr, runs in result.sweep.items():
        hits = [r.hit(target) for r in runs]
        if runs and all(h is not None for h in hits):
            steps = statistics.fmean(h[0] for h in hits)  # type: ignore[index]
            if best is None or steps < best[1]:
                best = (lr, steps, [r.seed for r in runs])
    return best


def adam_ratio_lines(entries: Sequence[TaskResult], arm: str = "DSGD adaptive") -> list[str]:
    """The target of issue 13: ``arm``'s steps to each target against best-tuned Adam's (≤ 1.5×):
    Adam at the rate chosen by final loss (every seed), and at the swept rate fastest to that target
    (on the selection seeds, against ``arm`` on the same seeds)."""
    lines = [
        f"| task | regime | target | {arm}: steps | seconds | Adam (best lr): steps | seconds | steps ratio | "
        "seconds ratio | Adam, fastest lr to the target (selection seeds) | steps ratio there | diverged |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        mine, adam = entry.arm(arm), entry.arm("Adam")
        if mine is None or adam is None:
            continue
        diverged = sum(r.diverged for r in mine.runs)
        for target in sorted(entry.task.targets, reverse=True):
            n, steps, seconds = _target_stats(mine, target)
            an, asteps, aseconds = _target_stats(adam, target)
            seeds = len(mine.runs)
            ratio_text = f"{steps / asteps:.2f}×" if n and an else "—"
            seconds_ratio = f"{seconds / aseconds:.2f}×" if n and an and aseconds > 0 else "—"
            fast = fastest_rate(adam, target)
            fast_text, fast_ratio = "—", "—"
            if fast is not None:
                lr, fsteps, fseeds = fast
                fast_text = f"{fsteps:.0f} (lr {lr:g})"
                mine_hits = [r.hit(target) for r in mine.runs if r.seed in fseeds]
                if mine_hits and all(h is not None for h in mine_hits):
                    fast_ratio = f"{statistics.fmean(h[0] for h in mine_hits) / fsteps:.2f}×"  # type: ignore[index]
            lines.append(
                f"| {entry.task.name} | {entry.task.regime} | {target:g} | {_steps_text(mine, target)} | "
                f"{_seconds(seconds)} | {_steps_text(adam, target)} (lr {adam.lr:g}) | {_seconds(aseconds)} | "
                f"{ratio_text} | {seconds_ratio} | {fast_text} | {fast_ratio} | {diverged}/{seeds} |"
            )
    return lines


def quality_verdicts(entries: Sequence[TaskResult]) -> list[str]:
    lines = []
    for entry in entries:
        task = entry.task
        peer = best_peer(entry)
        if peer is None:
            continue
        low = min(task.targets)
        pn, psteps, pseconds = _target_stats(peer, low)
        peer_text = (
            f"reaches {low} in {psteps:.0f} steps / {pseconds:.2f} s"
            + (f" on {pn}/{len(peer.runs)} seeds" if pn < len(peer.runs) else "")
            if pn
            else f"never reaches {low}"
        )
        lines.append(
            f"- **{task.title}** — best tuned peer {peer.arm} (lr {peer.lr:g}): {peer_text}, {_final_text(peer)}."
        )
        for name in ("DSGD adaptive", "DSGD certified", "DSGD adaptive, momentum 0.9"):
            result = entry.arm(name)
            if result is not None:
                one_layer = name == "DSGD certified"  # one layer per step
                moves = _shares(result) if one_layer else "every layer every step"
                lines.append(
                    f"  - {name}: {_against(result, peer, task)} → **{_verdict(result, peer, task)}**; moves {moves}."
                )
        lines += _choice_lines(entry)
        greedy = entry.arm("DSGD certified")
        alone = entry.arm("output layer alone")
        if alone and greedy:
            a, g = _robust_mean(alone), _robust_mean(greedy)
            full = [x for x in entry.results if x.arm != "output layer alone" and math.isfinite(_robust_mean(x))]
            best_full = min(full, key=_robust_mean) if full else None
            best_text = (
                f"{loss_text(_robust_mean(best_full))} for the best full training ({best_full.arm})"
                if best_full is not None
                else "no full training without divergence"
            )
            lines.append(
                f"  - Output layer alone: final {_loss_or_div(alone)} against {best_text} and "
                f"{_loss_or_div(greedy)} for DSGD certified"
                + (" (DSGD certified does no better than the output layer alone)." if g > 0.8 * a else ".")
            )
    return lines


def cost_headlines(
    config: Config, timing: Timing, lightning: dict[str, float], scalings: Sequence[Scaling]
) -> list[str]:
    lines = []
    spectral, muon = timing.step.get("DSGD spectral data", math.nan), timing.step.get("Muon", math.nan)
    verdict = "meets" if spectral <= muon else "misses"
    lines.append(
        f"- Spectral DSGD's optimizer step costs {ratio(spectral, muon)} Muon's on the {config.describe()} "
        f"({verdict} the target ≤ 1×)."
    )
    width = next((s for s in scalings if s.dimension == "width"), None)
    if width is not None:
        for value in width.values:
            t = width.timings.get(value)
            if t is None or "Muon" not in t.step or "DSGD spectral data" not in t.step or value < 512:
                continue
            spectral_w = t.step["DSGD spectral data"]
            lines.append(
                f"- At width {value} (depth {width.base.depth}): spectral DSGD step {ms(spectral_w)} ms "
                f"vs Muon {ms(t.step['Muon'])} ms ({ratio(spectral_w, t.step['Muon'])})."
            )
    if width is not None:
        largest = max(width.timings)
        t = width.timings[largest]
        parts = [f"{arm.replace(' data', '')} {ms(t.step[arm])} ms" for arm in t.step if arm.startswith("DSGD")]
        parts += [f"{arm.replace(' data', '')} {reason}" for arm, reason in t.skipped.items()]
        lines.append(
            f"- At width {largest}, optimizer step alone: SGD {ms(t.step.get('SGD', math.nan))} ms, Adam "
            f"{ms(t.step.get('Adam', math.nan))} ms; " + "; ".join(parts) + "."
        )
    for norm in ("frobenius", "linf"):
        arm = f"DSGD {norm} data"
        plain = timing.whole.get(arm, math.nan) / timing.whole.get("SGD", math.nan)
        light = lightning.get(arm, math.nan) / lightning.get("SGD", math.nan)

        def judged(value: float) -> str:
            if not math.isfinite(value):
                return "not measured"
            return f"{value:.2f}× ({'within' if value <= 1.05 else 'above'} the target ≤ 1.05×)"

        lines.append(
            f"- {norm} DSGD, whole training step against SGD's: {judged(plain)} in the plain loop, "
            f"{judged(light)} in Lightning."
        )
    return lines
