"""Where spectral DSGD's step goes on a wide MLP, and what two cheaper exact methods would save.

The package is not modified: the geometry methods of one ``DSGD`` instance are wrapped with timers
(instance attributes shadowing the methods), so each component's share of the step is measured in
the real step. Components:

* scoring: ``SpectralGeometry.dual_norms`` — the nuclear norm of every layer's gradient block
  (``torch.linalg.svdvals``, same-shape blocks batched);
* update: ``SpectralGeometry.duality_map`` — the full SVD of the chosen block for ``‖G‖_*·U Vᵀ``;
* constants: ``spectral_norms`` (through ``operator_norms``) — ``σ_max`` of every weight changed
  since the last step (another ``svdvals``), for the certified constants;
* the rest of ``DSGD.step`` (constants arithmetic, the one host sync, the in-place update).

Then the same decompositions are timed on one hidden block, against a **sketched exact** method:
a gradient of a layer fed ``N`` inputs per batch is ``Σ_t δ_t [x_t; 1]ᵀ``, of rank ``r ≤ N``. With
``k = r + 8`` columns, ``Q = qr(G Ω)`` (``Ω`` Gaussian ``n × k``) spans its range, ``B = QᵀG`` is
``k × n`` and the nuclear norm and polar factor come from the SVD of ``B``. For *any* ``Q`` the
direction ``D = Q U_B V_Bᵀ`` has ``‖D‖₂ = 1`` and ``⟨G, D⟩ = ‖B‖_*`` exactly (the residual
``(I − QQᵀ)G`` is orthogonal to ``D``), so ``‖B‖²_*/L`` is the guaranteed decrease of the step
actually applied; when ``Q`` captures the range (``r ≤ k``), ``‖B‖_* = ‖G‖_*`` up to rounding.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_common import Device, make_muon, median, mlp_widths, tanh_mlp
from torch import nn

from lightning_dsgd import DSGD
from lightning_dsgd.geometry import BlockGrad, SpectralGeometry, augment, signal_singular_values


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


def sketched_polar(grad: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(nuclear norm of ``QᵀG``, direction ``Q U_B V_Bᵀ``) — see the module docstring."""
    omega = torch.randn(grad.shape[1], k, generator=generator).to(grad.device, grad.dtype)
    q, _ = torch.linalg.qr(grad @ omega)
    u, s, vh = torch.linalg.svd(q.mT @ grad, full_matrices=False)
    return s.sum(), (q @ u) @ vh


def sketched_nuclear(grad: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    omega = torch.randn(grad.shape[1], k, generator=generator).to(grad.device, grad.dtype)
    q, _ = torch.linalg.qr(grad @ omega)
    return torch.linalg.svdvals(q.mT @ grad).sum()


class SketchedSpectral(SpectralGeometry):
    """Prototype (not in the package): the spectral geometry with the sketched nuclear norm and polar
    factor for blocks whose gradient rank is bounded by ``rank`` (the inputs per step) well below
    their size; other blocks keep the exact SVD. Scores and directions stay consistent: both are
    exact when the bound holds (see the module docstring)."""

    def __init__(self, rank: int, oversample: int = 8, seed: int = 0) -> None:
        self.k = rank + oversample
        self.generator = torch.Generator().manual_seed(seed)

    def _sketched(self, block: torch.Tensor) -> bool:
        return 2 * self.k <= min(block.shape)

    def dual_norms(self, grads: Sequence[BlockGrad]) -> torch.Tensor:
        exact = super().dual_norms([g if g is not None and not self._sketched(augment(*g)) else None for g in grads])
        device = next((g[0].device for g in grads if g is not None), exact.device)
        out = exact.to(device).clone()
        for i, g in enumerate(grads):
            if g is None:
                continue
            block = augment(*g).float()
            if self._sketched(block):
                out[i] = sketched_nuclear(block, self.k, self.generator).to(out.dtype)
        return out

    def duality_map(self, block: torch.Tensor) -> torch.Tensor:
        if not self._sketched(block):
            return super().duality_map(block)
        g = block.float()
        omega = torch.randn(g.shape[1], self.k, generator=self.generator).to(g.device)
        q, _ = torch.linalg.qr(g @ omega)
        u, s, vh = torch.linalg.svd(q.mT @ g, full_matrices=False)
        s = signal_singular_values(s, g.shape)
        return s.sum() * ((q @ (u * (s > 0))) @ vh)


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
    for label, selection, n, sketched in (
        ("greedy", "greedy", steps, False),
        ("cyclic", "cyclic", depth, False),
        ("greedy, sketched (prototype)", "greedy", steps, True),
        ("cyclic, sketched (prototype)", "cyclic", depth, True),
    ):
        model = copy.deepcopy(initial)
        optimizer = DSGD(model, selection=selection)  # type: ignore[arg-type]
        if sketched:
            optimizer.geometries["spectral"] = SketchedSpectral(batch)
        totals: dict[str, list[float]] = defaultdict(list)
        geometry = optimizer.geometries["spectral"]
        geometry.dual_norms = _timed(device, geometry.dual_norms, "scoring: nuclear norms", totals)  # type: ignore[method-assign]
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
    rank = min(batch + 1, *grad.shape)
    k = min(rank + 8, min(grad.shape))
    weight = layer_module.weight.detach()
    methods: dict[str, Callable[[], object]] = {
        "svdvals (nuclear norm now)": lambda: torch.linalg.svdvals(grad),
        "svd (duality map now)": lambda: torch.linalg.svd(grad, full_matrices=False),
        "σ_max of the weight (svdvals)": lambda: torch.linalg.matrix_norm(weight, ord=2),
        f"sketched nuclear norm (k={k})": lambda: sketched_nuclear(grad, k, generator),
        f"sketched polar + nuclear (k={k})": lambda: sketched_polar(grad, k, generator),
    }
    for name, fn in methods.items():
        fn()
        samples = []
        for _ in range(repeats):
            start = device.now()
            fn()
            samples.append(device.now() - start)
        profile.kernels[name] = median(samples)
    exact = torch.linalg.svdvals(grad.double()).sum()
    approx = sketched_nuclear(grad, k, generator).double()
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
