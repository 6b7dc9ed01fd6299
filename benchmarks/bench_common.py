"""Shared pieces of the benchmark harness (``benchmarks/harness.py``): the device and its clock,
interleaved timing, the environment record, the GPT-shaped model, and the optimizers compared
(the tanh MLP is ``examples.models.tanh_mlp``).

The compared optimizers, built the same way everywhere:

* ``SGD`` / ``Adam``: ``torch.optim.SGD`` / ``torch.optim.Adam`` on every parameter (no momentum,
  no weight decay).
* ``Muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5 Newton–Schulz steps, ``adjust_lr_fn``
  "original") on the 2-D weight matrices of the hidden layers, ``torch.optim.AdamW`` on everything
  else (biases, the output layer, embeddings, convolution kernels, normalisation affines) — the
  customary pairing, since Muon accepts only 2-D parameters. Weight decay 0 for both, as for the
  other arms. The two optimizers are stepped together by :class:`Combined`.
* ``DSGD``: :class:`lightning_dsgd.DSGD` on the model itself.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_dsgd import DSGD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- device
@dataclass(frozen=True)
class Device:
    """The device the harness runs on, and how to wait for it."""

    torch_device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def sync(self) -> None:
        """Block until queued kernels are done (CUDA launches are asynchronous)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def now(self) -> float:
        """A timestamp after every queued kernel finished."""
        self.sync()
        return time.perf_counter()

    def describe(self) -> str:
        if self.is_cuda:
            return f"{torch.cuda.get_device_name(self.torch_device)} (CUDA {torch.version.cuda})"
        return f"CPU: {cpu_name()}"


def make_device(name: str) -> Device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for, but torch.cuda.is_available() is False.")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:k], got {name!r}.")
    return Device(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Device, started: float) -> dict[str, str]:
    """What the page records about the run."""
    import lightning

    try:
        commit = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "lightning_dsgd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (lightning_dsgd/ modified)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return {
        "date": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.describe(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "cpu cores": str(os.cpu_count()),
        "load average at start": load,
        "commit": commit,
    }


# ---------------------------------------------------------------------------------------------- timing
def interleaved(
    calls: Sequence[Callable[[], object]],
    setups: Sequence[Callable[[], object]],
    device: Device,
    warmup: int,
    repeats: int,
    cap_s: float = float("inf"),
    budget_s: float = 0.0,
    max_repeats: int = 200,
) -> list[list[float]]:
    """Seconds of every ``calls[k]()`` (each after its untimed ``setups[k]()``), the candidates
    interleaved call by call so that load drift on a shared machine hits all alike.

    At least ``repeats`` rounds after ``warmup``; while the rounds so far took less than
    ``budget_s`` seconds, more rounds run (up to ``max_repeats``), so that cheap calls get many
    samples. A candidate whose single call exceeds ``cap_s`` is not repeated further (it keeps the
    samples it has)."""
    samples: list[list[float]] = [[] for _ in calls]
    done = [False] * len(calls)
    began = time.perf_counter()
    i = 0
    while i < warmup + repeats or (time.perf_counter() - began < budget_s and i < warmup + max_repeats):
        if all(done):
            break
        for k, (call, setup) in enumerate(zip(calls, setups, strict=True)):
            if done[k]:
                continue
            setup()
            start = device.now()
            call()
            elapsed = device.now() - start
            if i >= warmup or elapsed > cap_s:
                samples[k].append(elapsed)
            if elapsed > cap_s:
                done[k] = True
        i += 1
    return samples


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------- models
class GPTBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention (separate q, k, v, o projections) and a
    GELU MLP of 4× the width, each on a residual branch."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(batch, length, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    """GPT-shaped language model: token and position embeddings, ``depth`` pre-norm blocks, a final
    LayerNorm and a linear head over the vocabulary."""

    def __init__(self, vocab: int, width: int, depth: int, length: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(GPTBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def mlp_widths(in_features: int, width: int, depth: int, classes: int) -> list[int]:
    """``depth`` Linear layers: ``in → width → … → width → classes``."""
    return [in_features] + [width] * (depth - 1) + [classes]


# ---------------------------------------------------------------------------------------------- optimizers
class Combined(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon on the hidden matrices + AdamW on the rest)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        params = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        super().__init__(params, {})
        # The param groups are the members' own (so schedulers and Lightning see real groups).
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:  # pragma: no cover - not used by the harness
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:  # pragma: no cover - not used by the harness
        for opt, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(state)


def head_module(model: nn.Module) -> nn.Module:
    """The output layer: the model's ``head`` attribute, else its last ``nn.Linear``."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear output layer")
    return linears[-1]


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden 2-D weight matrices for Muon, everything else for AdamW)."""
    head = head_module(model)
    in_head = {id(p) for p in head.parameters()}
    muon_ids: set[int] = set()
    for module in model.modules():
        if module is head or isinstance(module, nn.Embedding):
            continue
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            muon_ids.add(id(module.weight))
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            muon_ids.add(id(module.in_proj_weight))
    trainable = [p for p in model.parameters() if p.requires_grad]
    muon = [p for p in trainable if id(p) in muon_ids and id(p) not in in_head and p.ndim == 2]
    chosen = {id(p) for p in muon}
    return muon, [p for p in trainable if id(p) not in chosen]


def make_sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def make_adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def make_muon(model: nn.Module, lr: float, adamw_lr: float) -> torch.optim.Optimizer:
    muon, rest = muon_split(model)
    optimizers: list[torch.optim.Optimizer] = []
    if muon:
        optimizers.append(torch.optim.Muon(muon, lr=lr, weight_decay=0.0))
    if rest:
        optimizers.append(torch.optim.AdamW(rest, lr=adamw_lr, weight_decay=0.0))
    return Combined(optimizers)


def make_dsgd(model: nn.Module, **kwargs: object) -> DSGD:
    return DSGD(model, **kwargs)  # type: ignore[arg-type]
