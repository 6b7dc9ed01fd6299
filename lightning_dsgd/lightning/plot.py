"""A picture of DSGD's decisions over a run, for people who do not use W&B (matplotlib, optional)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MATPLOTLIB_HINT = (
    "The DSGD picture needs matplotlib: pip install matplotlib (or pip install 'lightning-dsgd[examples]'), "
    "or pass DSGDMonitor(plot=False)."
)


@dataclass
class History:
    """DSGD's decisions at the logged steps only (so it stays small): one entry per logged step.
    ``layers`` holds ``None`` for a skipped step; ``realized`` the realized decrease of that step
    (full-batch mode, filled in one step later), else ``None``."""

    steps: list[int] = field(default_factory=list)
    layers: list[int | None] = field(default_factory=list)
    certified: list[bool] = field(default_factory=list)
    stationarity: list[float] = field(default_factory=list)
    guaranteed: list[float] = field(default_factory=list)
    realized: list[float | None] = field(default_factory=list)
    constants: list[list[float]] = field(default_factory=list)

    def append(
        self, step: int, layer: int | None, certified: bool, stationarity: float, guaranteed: float, constants: list
    ) -> None:
        self.steps.append(step)
        self.layers.append(layer)
        self.certified.append(certified)
        self.stationarity.append(stationarity)
        self.guaranteed.append(guaranteed)
        self.realized.append(None)
        self.constants.append(constants)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        """One line, however long the run: how many steps, which, how many certified or skipped."""
        if not self.steps:
            return "History(0 logged steps)"
        skipped = sum(layer is None for layer in self.layers)
        realized = sum(r is not None for r in self.realized)
        return (
            f"History({len(self.steps)} logged steps {self.steps[0]}…{self.steps[-1]}, "
            f"{sum(self.certified)} certified, {skipped} skipped, {realized} with a realized decrease)"
        )


def require_matplotlib() -> None:
    """Raise an ``ImportError`` that says how to install matplotlib, if it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(MATPLOTLIB_HINT) from error


def save_history_png(
    history: History, layer_names: list[str], path: str | Path, title: str = "DSGD", every_layer: bool = False
) -> Path:
    """Save three panels over the logged steps to ``path`` (PNG, 900×900 px): the chosen layer
    (filled: certified, hollow: not certified, red ×: skipped) — with ``every_layer`` (several
    layers moved per step) the layer of largest promised decrease, the greedy pick; the stationarity measure and the
    promised decrease — "guaranteed" on certified steps, "estimated" on the others — (and, in
    full-batch mode, the realized decrease) on a log scale; each layer's smoothness constant ``L_i``
    on a log scale."""
    require_matplotlib()
    from matplotlib.figure import Figure  # without pyplot: no global state, no GUI backend

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(9, 9), dpi=100, layout="constrained")
    ax_layer, ax_bounds, ax_constants = fig.subplots(3, 1, sharex=True)
    steps = history.steps
    n = len(layer_names)

    counts = [sum(1 for layer in history.layers if layer == i) for i in range(n)]
    chosen = [
        (s, layer, c) for s, layer, c in zip(steps, history.layers, history.certified, strict=True) if layer is not None
    ]
    for certified, style in ((True, {"color": "C0"}), (False, {"facecolors": "none", "edgecolors": "C0"})):
        points = [(s, layer) for s, layer, c in chosen if c == certified]
        if points:
            label = "certified" if certified else "not certified"
            ax_layer.scatter(*zip(*points, strict=True), s=14, marker="o", label=label, **style)
    skipped = [s for s, layer in zip(steps, history.layers, strict=True) if layer is None]
    ticks, labels = list(range(n)), [f"{name} ({count})" for name, count in zip(layer_names, counts, strict=True)]
    if skipped:
        ax_layer.scatter(skipped, [-1] * len(skipped), marker="x", color="C3", s=20, label="skipped")
        ticks, labels = [-1, *ticks], ["skipped", *labels]
    ax_layer.set_yticks(ticks, labels)
    ax_layer.set_ylim(min(ticks) - 0.5, n - 0.5)
    what = "greedy pick (largest estimated decrease; every layer moves)" if every_layer else "chosen layer"
    ax_layer.set_ylabel("greedy pick (count)" if every_layer else "chosen layer (count)")
    ax_layer.set_title(f"{title}: {what} at {len(steps)} logged steps")
    ax_layer.legend(loc="upper right", fontsize="small")

    ax_bounds.plot(steps, _positive(history.stationarity), label="stationarity  max_i ‖g_i‖*/√L_i", color="C1")
    for label, values in decrease_series(history):
        ax_bounds.plot(steps, _positive(values), label=label, color="C2", ls="-" if label.startswith("guar") else ":")
    if any(r is not None for r in history.realized):
        ax_bounds.plot(steps, _positive(history.realized), label="realized decrease", color="C4", ls="--")
    ax_bounds.set_yscale("log")
    ax_bounds.set_title("stationarity and decrease per step")
    ax_bounds.legend(loc="best", fontsize="small")

    for i, name in enumerate(layer_names):
        ax_constants.plot(steps, _positive([c[i] for c in history.constants]), label=name)
    ax_constants.set_yscale("log")
    ax_constants.set_title("smoothness constant L_i per layer")
    ax_constants.set_xlabel("step (trainer/global_step)")
    ax_constants.legend(loc="best", fontsize="small", ncols=min(n, 4))
    fig.savefig(path, format="png")
    return path


def decrease_series(history: History) -> list[tuple[str, list[float | None]]]:
    """The promised decrease as the chart draws it: "guaranteed" on certified steps only, and
    "estimated" on the others (gaps elsewhere); a series with no step is left out."""
    series = []
    for certified, label in ((True, "guaranteed decrease (certified)"), (False, "estimated decrease (not certified)")):
        values = [g if c == certified else None for g, c in zip(history.guaranteed, history.certified, strict=True)]
        if any(v is not None for v in values):
            series.append((label, values))
    return series


def _positive(values: list[float | None]) -> list[float]:
    """Values a log axis can show: non-positive, missing or non-finite ones become gaps."""
    return [v if v is not None and v > 0 and math.isfinite(v) else math.nan for v in values]
