"""Where spectral DSGD's step goes on a wide MLP, before and after the package's two cheap exact paths.

The package is not modified: the geometry methods of one ``DSGD`` instance are wrapped with timers
(instance attributes shadowing the methods), so each component's share of the step is measured in
the real step. Components:

* scoring: ``SpectralGeometry.dual_norms_and_bases`` — the nuclear norm of every layer's gradient
  block (same-shape blocks batched);
* update: ``SpectralGeometry.duality_map`` — ``‖G‖_*·U Vᵀ`` of the chosen block;
* constants: ``spectral_norms`` (through ``operator_norms``) — ``σ_max`` of weights, for the
  certified constants;
* the rest of ``DSGD.step`` (constants arithmetic, the host sync, the in-place update).

Two variants of each selection rule run from the same weights and batches:

* **package** (the defaults): a gradient of a layer fed ``N`` input rows has rank ≤ ``N``; with
  ``k = N + 8`` small against the block, a randomized range finder ``Q`` (``n × k``) gives the
  nuclear norm and polar factor from the ``m × k`` matrix ``G Q`` — exact when the rank bound
  holds, and the guaranteed decrease is that of the step applied in any case (``SpectralGeometry``).
  The ``σ_max`` of a weight DSGD moved follows by the triangle inequality, recomputed once it has
  grown 2% past its last exact value (``lightning_dsgd.norm_bounds``);
* **exact SVDs** (the package before): ``svdvals``/``svd`` of every full block, ``σ_max`` recomputed
  after every move — ``SKETCH_MAX_FRACTION = 0`` and a zero tolerance on that instance.

Then the decompositions are timed on one hidden block.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks.bench_common import Device, make_muon, median, mlp_widths
from examples.models import tanh_mlp
from lightning_dsgd import DSGD
from lightning_dsgd.geometry import SpectralGeometry, augment


@dataclass
class Variant:
    """Steps of one layer-selection rule: the median step and each component's total time."""

    selection: str
    steps: int
    step_seconds: float
    components: dict[str, tuple[int, float]] = field(default_factory=dict)  # name → (calls, seconds), all steps
    picks: list[int] = field(default_factory=list)


@dataclass
class Profile:
    widths: list[int]
    batch: int
    backward_seconds: float  # median zero_grad + forward + backward, with DSGD's hooks
    variants: dict[str, Variant] = field(default_factory=dict)
    top_ops: list[tuple[str, float, int]] = field(default_factory=list)  # (op, self seconds per step, calls)
    kernels: dict[str, float] = field(default_factory=dict)  # one hidden block: method → seconds
    muon_step_seconds: float = float("nan")  # median Muon + AdamW step on the same model
    sketch_error: float = float("nan")  # relative error of the sketched nuclear norm
    sketch_rank: int = 0


def _timed(device: Device, fn: Callable[..., Any], name: str, totals: dict[str, list[float]]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = device.now()
        out = fn(*args, **kwargs)
        totals[name].append(device.now() - start)
        return out

    return wrapper


def profile_spectral(
    device: Device, width: int, depth: int, batch: int, steps: int, repeats: int, with_profiler: bool = True
) -> Profile:
    """Greedy DSGD for ``steps`` steps, then cyclic DSGD for one step per layer (so that every
    block, the wide hidden ones included, is updated once), from the same initial weights."""
    dev = device.torch_device
    widths = mlp_widths(64, width, depth, 10)
    torch.manual_seed(0)
    initial = tanh_mlp(widths).to(dev)
    generator = torch.Generator().manual_seed(1)
    count = max(steps, depth)
    xs = [torch.randn(batch, 64, generator=generator).to(dev) for _ in range(count + 1)]
    ys = [torch.randint(10, (batch,), generator=generator).to(dev) for _ in range(count + 1)]
    profile = Profile(widths, batch, math.nan)
    backward_times: list[float] = []
    for label, selection, n, exact in (
        ("greedy", "greedy", steps, False),
        ("cyclic", "cyclic", depth, False),
        ("greedy, exact SVDs (before)", "greedy", steps, True),
        ("cyclic, exact SVDs (before)", "cyclic", depth, True),
    ):
        model = copy.deepcopy(initial)
        optimizer = DSGD(model, constants="data", selection=selection)  # type: ignore[arg-type]
        totals: dict[str, list[float]] = defaultdict(list)
        geometry = optimizer.geometries["spectral"]
        if exact:
            geometry.SKETCH_MAX_FRACTION = {"cpu": 0.0, "cuda": 0.0}  # type: ignore[misc]
            optimizer.constant_model.operator_norms.tolerance = 0.0
        geometry.dual_norms_and_bases = _timed(  # type: ignore[method-assign]
            device, geometry.dual_norms_and_bases, "scoring: nuclear norms", totals
        )
        geometry.duality_map = _timed(device, geometry.duality_map, "update: duality map", totals)  # type: ignore[method-assign]
        constants_geometry = optimizer.constant_model.geometry
        constants_geometry.operator_norms = _timed(  # type: ignore[method-assign]
            device, constants_geometry.operator_norms, "constants: σ_max of changed weights", totals
        )

        def backward(i: int, model: nn.Module = model, optimizer: DSGD = optimizer) -> None:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xs[i]), ys[i]).backward()

        # Warm-up on another batch (first LAPACK calls, caches), undone by restarting the counters.
        backward(count)
        optimizer.score()
        totals.clear()
        step_times = []
        for i in range(n):
            start = device.now()
            backward(i)
            backward_times.append(device.now() - start)
            start = device.now()
            optimizer.step()
            step_times.append(device.now() - start)
        variant = Variant(label, n, median(step_times), picks=list(optimizer.selection_counts))
        accounted = 0.0
        for name in (
            "scoring: nuclear norms",
            "constants: σ_max of changed weights",
            "update: duality map",
        ):
            values = totals.get(name, [])
            variant.components[name] = (len(values), sum(values))
            accounted += sum(values)
        variant.components["rest of DSGD.step"] = (n, sum(step_times) - accounted)
        profile.variants[label] = variant

        if with_profiler and label == "greedy":
            profile.top_ops = _top_ops(device, lambda opt=optimizer: (backward(0), opt.step()), min(n, 2))
    profile.backward_seconds = median(backward_times)

    # Muon (+ AdamW on the biases and the output layer) on the same model and batches.
    model = copy.deepcopy(initial)
    muon = make_muon(model, 1e-4, 1e-4)
    muon_times = []
    for i in range(-1, count):
        muon.zero_grad()
        nn.functional.cross_entropy(model(xs[i]), ys[i]).backward()
        start = device.now()
        muon.step()
        if i >= 0:
            muon_times.append(device.now() - start)
    profile.muon_step_seconds = median(muon_times)

    # One hidden block, decomposed every way.
    model = copy.deepcopy(initial)
    layer_module = model[2]
    nn.functional.cross_entropy(model(xs[0]), ys[0]).backward()
    grad = augment(layer_module.weight.grad, layer_module.bias.grad).float()
    rank = min(batch, *grad.shape)
    weight = layer_module.weight.detach()
    geometry = SpectralGeometry()
    pair = [(grad[:, :-1], grad[:, -1])]
    k = geometry.sketch_size(grad.shape, rank)
    basis = geometry.dual_norms_and_bases(pair, [rank])[1][0]
    methods: dict[str, Callable[[], object]] = {
        "svdvals (exact nuclear norm)": lambda: torch.linalg.svdvals(grad),
        "svd (exact duality map)": lambda: torch.linalg.svd(grad, full_matrices=False),
        "σ_max of the weight (svdvals)": lambda: torch.linalg.matrix_norm(weight, ord=2),
    }
    if k is not None:
        methods[f"sketched nuclear norm (k={k})"] = lambda: geometry.dual_norms_and_bases(pair, [rank])
        methods[f"sketched duality map (k={k})"] = lambda: geometry.duality_map(grad, basis)
    for name, fn in methods.items():
        fn()
        samples = []
        for _ in range(repeats):
            start = device.now()
            fn()
            samples.append(device.now() - start)
        profile.kernels[name] = median(samples)
    exact = torch.linalg.svdvals(grad.double()).sum()
    approx = geometry.dual_norms_and_bases(pair, [rank])[0][0].double()
    profile.sketch_error = ((approx - exact).abs() / exact).item()
    profile.sketch_rank = rank
    return profile


def _top_ops(device: Device, step: Callable[[], object], count: int) -> list[tuple[str, float, int]]:
    """The operators with the most self time over ``count`` whole steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.is_cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(count):
            step()
    key = "self_device_time_total" if device.is_cuda else "self_cpu_time_total"
    ranked = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    return [(e.key, getattr(e, key) / 1e6 / count, e.count // count) for e in ranked[:6]]
