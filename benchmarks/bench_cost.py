"""What a step costs: the optimizer step alone and the whole training step (plain PyTorch loop and
Lightning ``Trainer.fit``), DSGD against SGD, Adam and Muon on the same tanh MLP, and how the cost
grows with depth, width and batch size.

Every measurement builds one model per arm from the same initial weights and interleaves the arms
call by call (``bench_common.interleaved``), so that load drift on a shared machine hits every arm
alike; the median of the repeats is reported, and ratios are taken within one run.

* Step alone: ``optimizer.step()`` on gradients computed once. DSGD's data and adaptive constants
  need the input norms of a forward pass (with gradients enabled) since the last step, so every arm
  runs that forward before each timed step, outside the timed region.
* Whole step: ``zero_grad``, forward, cross-entropy, backward, ``step``.
* Lightning step: ``Trainer.fit`` on the same model and batch size, as an ordinary automatic-
  optimization ``LightningModule`` (SGD, Adam, Muon+AdamW) or the same module with ``DSGDMixin``;
  a callback times ``on_train_batch_start`` → ``on_train_batch_end`` (CUDA synchronised) and the
  median step after the first ``warmup`` is taken; fits of the arms alternate, ``rounds`` times.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks.bench_common import (
    GPT,
    Device,
    interleaved,
    make_adam,
    make_dsgd,
    make_muon,
    make_sgd,
    median,
    mlp_widths,
)
from examples.models import tanh_mlp
from lightning_dsgd import DSGD
from lightning_dsgd import geometry as geometry_module
from lightning_dsgd.polar import certify_iteration, polar_iteration
from lightning_dsgd.precision import full_precision

NORMS = ("spectral", "frobenius", "linf")
CONSTANTS = ("data", "architecture", "adaptive")
PEERS = ("SGD", "Adam", "Muon")

# Learning rates do not change the cost; these only keep the weights finite over the repeats.
LR = {"SGD": 1e-3, "Adam": 1e-4, "Muon": 1e-4}


def build(arm: str, model: nn.Module) -> torch.optim.Optimizer:
    """``SGD``, ``Adam``, ``Muon`` or ``DSGD <norm> <constants>``."""
    if arm == "SGD":
        return make_sgd(model, LR["SGD"])
    if arm == "Adam":
        return make_adam(model, LR["Adam"])
    if arm == "Muon":
        return make_muon(model, LR["Muon"], LR["Adam"])
    _, norm, constants = arm.split()
    return make_dsgd(model, norm=norm, constants=constants)


def dsgd_arm(norm: str, constants: str = "data") -> str:
    return f"DSGD {norm} {constants}"


@dataclass(frozen=True)
class Config:
    in_features: int = 64
    width: int = 256
    depth: int = 4
    batch: int = 128
    classes: int = 10

    @property
    def widths(self) -> list[int]:
        return mlp_widths(self.in_features, self.width, self.depth, self.classes)

    def describe(self) -> str:
        return f"tanh MLP {'-'.join(map(str, self.widths))}, batch {self.batch}"

    def describe_except(self, dimension: str) -> str:
        """The sizes other than ``dimension`` (the one a scaling table varies)."""
        sizes = {
            "depth": f"depth {self.depth} (Linear layers)",
            "width": f"width {self.width}",
            "batch": f"batch {self.batch}",
        }
        return (
            ", ".join(v for k, v in sizes.items() if k != dimension)
            + f", input {self.in_features}, {self.classes} classes"
        )


@dataclass
class Timing:
    """Median seconds per call of each arm (NaN: not measured), and the sample counts."""

    step: dict[str, float] = field(default_factory=dict)
    whole: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    picks: dict[str, list[int]] = field(default_factory=dict)  # DSGD: layers moved in the whole steps


def measure(
    config: Config,
    arms: list[str],
    device: Device,
    warmup: int,
    repeats: int,
    cap_s: float = math.inf,
    budget_s: float = 0.0,
    seed: int = 0,
) -> Timing:
    """Step-alone and whole-step medians of ``arms`` on one model configuration."""
    torch.manual_seed(seed)
    dev = device.torch_device
    x = torch.randn(config.batch, config.in_features, device=dev)
    y = torch.randint(config.classes, (config.batch,), device=dev)
    base = tanh_mlp(config.widths).to(dev)
    models = {arm: copy.deepcopy(base) for arm in arms}
    optimizers = {arm: build(arm, models[arm]) for arm in arms}

    def backward(arm: str) -> None:
        optimizers[arm].zero_grad()
        nn.functional.cross_entropy(models[arm](x), y).backward()

    def whole(arm: str) -> Callable[[], None]:
        def run() -> None:
            backward(arm)
            optimizers[arm].step()

        return run

    def forward(arm: str) -> Callable[[], None]:
        def run() -> None:
            with torch.enable_grad():
                models[arm](x)

        return run

    for arm in arms:  # one untimed first step: one-time work (DSGD's first exact σ_max, Adam's state)
        backward(arm)
        optimizers[arm].step()
        backward(arm)
    steps = interleaved(
        [optimizers[a].step for a in arms], [forward(a) for a in arms], device, warmup, repeats, cap_s, budget_s
    )
    before = {a: list(o.selection_counts) for a, o in optimizers.items() if isinstance(o, DSGD)}
    wholes = interleaved([whole(a) for a in arms], [_nothing for _ in arms], device, warmup, repeats, cap_s, budget_s)
    timing = Timing()
    for arm, counts in before.items():
        after = optimizers[arm].selection_counts  # type: ignore[attr-defined]
        timing.picks[arm] = [n - b for n, b in zip(after, counts, strict=True)]
    for arm, s, w in zip(arms, steps, wholes, strict=True):
        timing.step[arm] = median(s)
        timing.whole[arm] = median(w)
        timing.samples[arm] = min(len(s), len(w))
    return timing


# ---------------------------------------------------------------------------------------------- GPT-shaped
#: Spectral DSGD with its automatic choice of path per block, and forced onto each path.
GPT_PATHS = {"DSGD spectral": "auto", "DSGD spectral exact": "never", "DSGD spectral matmul": "always"}
GPT_ARMS = ["Muon", *GPT_PATHS]
#: Parts of a step timed on their own beside the whole steps (``measure_gpt``): Muon's Newton–Schulz
#: steps on the hidden matrices' gradients, and the two halves of the matmul path on the blocks that
#: spectral DSGD hands to ``polar_directions`` (the iteration, then the certificate of ``‖X‖₂``).
GPT_PARTS = ("Muon Newton–Schulz", "DSGD iteration", "DSGD certificate")


@dataclass(frozen=True)
class GPTConfig:
    width: int
    depth: int = 4
    vocab: int = 512
    length: int = 256
    batch: int = 4
    head_width: int = 64

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    def describe(self) -> str:
        return (
            f"GPT-shaped, {self.depth} pre-norm blocks of width w (w/{self.head_width} heads, MLP 4w), "
            f"vocabulary {self.vocab}, {self.batch} × {self.length} = {self.tokens} tokens"
        )


def build_gpt_arm(arm: str, model: nn.Module) -> torch.optim.Optimizer:
    """``Muon`` (Muon on the hidden matrices, AdamW on embeddings, norms, biases and head) or a
    spectral DSGD arm of ``GPT_PATHS`` (data constants: outside the rigorous class they adapt)."""
    if arm == "Muon":
        return make_muon(model, LR["Muon"], LR["Adam"])
    optimizer = make_dsgd(model, norm="spectral", constants="data")
    optimizer.geometries["spectral"].polar = GPT_PATHS[arm]  # type: ignore[attr-defined]
    return optimizer


def measure_gpt(
    config: GPTConfig,
    arms: list[str],
    device: Device,
    warmup: int,
    repeats: int,
    budget_s: float = 0.0,
    seed: int = 0,
    parts_too: bool = True,
) -> Timing:
    """Median seconds of ``optimizer.step()`` alone on one fixed batch's gradients (each arm's
    forward, which DSGD's data constants need, runs untimed before each step), arms interleaved; with
    ``parts_too`` (and the ``Muon`` and ``DSGD spectral matmul`` arms), the ``GPT_PARTS`` interleaved
    with them."""
    torch.manual_seed(seed)
    dev = device.torch_device
    tokens = torch.randint(config.vocab, (config.batch, config.length), device=dev)
    base = GPT(config.vocab, config.width, config.depth, config.length, config.width // config.head_width).to(dev)
    models = {arm: copy.deepcopy(base) for arm in arms}
    optimizers = {arm: build_gpt_arm(arm, models[arm]) for arm in arms}

    def loss(arm: str) -> torch.Tensor:
        logits = models[arm](tokens[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def forward(arm: str) -> Callable[[], None]:
        def run() -> None:
            with torch.enable_grad():
                models[arm](tokens[:, :-1])

        return run

    stacks: list[torch.Tensor] = []  # the blocks the matmul path gets, as its arm's first step handed them over
    for arm in arms:  # gradients once; one untimed step (first exact σ_max, Muon's buffers)
        optimizers[arm].zero_grad()
        loss(arm).backward()
        with _recording_polar_inputs(stacks if arm == "DSGD spectral matmul" else []):
            optimizers[arm].step()
    parts = _gpt_parts(optimizers.get("Muon"), stacks) if parts_too else {}
    calls = [optimizers[a].step for a in arms] + list(parts.values())
    setups = [forward(a) for a in arms] + [_nothing] * len(parts)
    steps = interleaved(calls, setups, device, warmup, repeats, budget_s=budget_s)
    timing = Timing()
    for arm, samples in zip([*arms, *parts], steps, strict=True):
        timing.step[arm] = median(samples)
        timing.samples[arm] = len(samples)
        optimizer = optimizers.get(arm)
        if isinstance(optimizer, DSGD):
            timing.picks[arm] = list(optimizer.selection_counts)
    return timing


def _nothing() -> None:
    pass


@contextlib.contextmanager
def _recording_polar_inputs(into: list[torch.Tensor]) -> Iterator[None]:
    """Within: copies of the stacks ``SpectralGeometry`` hands to ``polar_directions`` go to ``into``."""
    original = geometry_module.polar_directions

    def recording(stack: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        into.append(stack.clone())
        return original(stack, *args, **kwargs)

    geometry_module.polar_directions = recording  # type: ignore[assignment]
    try:
        yield
    finally:
        geometry_module.polar_directions = original  # type: ignore[assignment]


def _gpt_parts(muon: torch.optim.Optimizer | None, stacks: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    """``GPT_PARTS`` as calls: Muon's ``_zeropower_via_newtonschulz`` on every hidden matrix's
    gradient with its group's settings (what ``torch.optim.Muon`` runs on the momentum), and
    ``polar_iteration`` / ``certify_iteration`` (the two halves of ``polar_directions``) on the
    recorded stacks and their iterates; none if either input is missing."""
    if muon is None or not stacks:
        return {}
    from torch.optim._muon import _zeropower_via_newtonschulz  # what torch.optim.Muon calls

    groups = [g for o in getattr(muon, "optimizers", [muon]) if isinstance(o, torch.optim.Muon) for g in o.param_groups]
    hidden = [(p.grad, g) for g in groups for p in g["params"] if p.grad is not None]
    factors = [1.0 / torch.linalg.vector_norm(s, dim=(-2, -1)) for s in stacks]
    with full_precision([stacks[0].device.type]):
        iterates = [polar_iteration(s, f) for s, f in zip(stacks, factors, strict=True)]

    def newton_schulz() -> None:
        for grad, g in hidden:
            _zeropower_via_newtonschulz(grad, g["ns_coefficients"], g["ns_steps"], g["eps"])

    def iteration() -> None:
        with full_precision([stacks[0].device.type]):
            for s, f in zip(stacks, factors, strict=True):
                polar_iteration(s, f)

    def certificate() -> None:
        with full_precision([stacks[0].device.type]):
            for x in iterates:
                certify_iteration(x)

    return dict(zip(GPT_PARTS, (newton_schulz, iteration, certificate), strict=True))


# ---------------------------------------------------------------------------------------------- scaling
@dataclass
class Scaling:
    """``timings[value]`` for each value of the varied dimension."""

    dimension: str
    values: list[int]
    base: Config
    timings: dict[int, Timing] = field(default_factory=dict)


# Newton–Schulz and full SVDs grow cubically with width (spectral DSGD falls back to full SVDs when
# the batch is not small against the width).
CUBIC = ("Muon", dsgd_arm("spectral"))


def scale(
    dimension: str,
    values: list[int],
    base: Config,
    arms: list[str],
    device: Device,
    warmup: int,
    repeats: int,
    cap_s: float,
    skip_s: float,
    log: Callable[[str], None],
    budget_s: float = 0.0,
) -> Scaling:
    """Measure ``arms`` as ``dimension`` (depth, width or batch) runs through ``values``. An arm
    whose predicted call time (its last time × the growth of its dominant term: cubic in width for
    the matrix decompositions, linear otherwise) exceeds ``skip_s`` is skipped at larger sizes."""
    result = Scaling(dimension, values, base)
    last: dict[str, tuple[int, float]] = {}
    for value in values:
        config = Config(**{**base.__dict__, dimension: value})
        measured, skipped = [], {}
        for arm in arms:
            if arm in last:
                previous_value, previous_time = last[arm]
                growth = value / previous_value
                power = 3 if dimension == "width" and arm in CUBIC else 2 if dimension == "width" else 1
                predicted = previous_time * growth**power
                if predicted > skip_s:
                    skipped[arm] = f"skipped: ≈{predicted:.0f} s per step predicted"
                    continue
            measured.append(arm)
        timing = measure(config, measured, device, warmup, repeats, cap_s, budget_s)
        timing.skipped.update(skipped)
        for arm in measured:
            last[arm] = (value, max(timing.whole[arm], timing.step[arm]))
        for arm in skipped:
            last.pop(arm, None)
            last[arm] = (value, math.inf)
        result.timings[value] = timing
        log(
            f"  {dimension}={value}: "
            + ", ".join(f"{a} {timing.step[a] * 1e3:.2f}/{timing.whole[a] * 1e3:.2f} ms" for a in measured)
            + (f" (skipped {', '.join(skipped)})" if skipped else "")
        )
    return result


# ---------------------------------------------------------------------------------------------- Lightning
def lightning_step_costs(
    config: Config, arms: list[str], device: Device, steps: int, warmup: int, rounds: int, log: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Median seconds per Lightning training step of each arm (``Trainer.fit``), and for the DSGD
    arms how often each layer was moved over all fits."""
    import time

    from lightning.pytorch import Callback, LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dsgd import DSGDMixin, DSGDSettings

    torch.manual_seed(0)
    x = torch.randn(config.batch * 8, config.in_features)
    y = torch.randint(config.classes, (config.batch * 8,))
    data = TensorDataset(x, y)

    class MLPModule(LightningModule):
        def __init__(self, arm: str) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.arm = arm
            self.net = tanh_mlp(config.widths)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.cross_entropy(self(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return build(self.arm, self)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(data, batch_size=config.batch, shuffle=True, drop_last=True)

    class DSGDModule(DSGDMixin, MLPModule):
        pass

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self._start = device.now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self.times.append(device.now() - self._start)

    def fit(arm: str) -> float:
        if arm.startswith("DSGD"):
            _, norm, constants = arm.split()
            module: LightningModule = DSGDModule(arm, dsgd=DSGDSettings(norm=norm, constants=constants))  # type: ignore[arg-type]
        else:
            module = MLPModule(arm)
        timer = StepTimer()
        trainer = Trainer(
            accelerator="gpu" if device.is_cuda else "cpu",
            devices=[device.torch_device.index or 0] if device.is_cuda else 1,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(module)
        if isinstance(module, DSGDMixin):
            counts = module.dsgd_optimizer.selection_counts
            previous = picks.setdefault(arm, [0] * len(counts))
            picks[arm] = [a + b for a, b in zip(previous, counts, strict=True)]
        return median(timer.times[warmup:])

    picks: dict[str, list[int]] = {}
    per_arm: dict[str, list[float]] = {arm: [] for arm in arms}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|GPU available).*")
        warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
        for r in range(rounds):
            begin = time.perf_counter()
            for arm in arms:
                per_arm[arm].append(fit(arm))
            log(f"  Lightning round {r + 1}/{rounds}: {time.perf_counter() - begin:.0f} s")
    return {arm: median(values) for arm, values in per_arm.items()}, picks
