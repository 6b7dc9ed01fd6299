"""Cost of a DSGD step relative to ``torch.optim.SGD`` on the same tanh MLP.

For every norm and both constants modes, two ratios measured in one run, DSGD and SGD timed
alternately (so load drift hits both alike), median over ``--repeats`` after ``--warmup``:

* step alone: ``opt.step()`` on gradients computed once. DSGD with ``constants="data"`` needs the
  input norms of a forward pass (with grad enabled) since its last step, so that forward runs
  before each timed step, outside the timed region; ``constants="architecture"`` gets a
  ``data_bound`` and needs none.
* whole step: ``zero_grad``, forward, cross-entropy, backward, ``step``.

    python benchmarks/step_overhead.py
    python benchmarks/step_overhead.py --width 1024 --device cuda

On a CPU shared with other busy processes, OpenMP's spinning worker threads can slow every
parallel op by orders of magnitude: run with ``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_dsgd import DSGD

NORMS = ("frobenius", "spectral", "linf")
MODES = ("data", "architecture")


@dataclass(frozen=True)
class Row:
    """Median seconds per call; ``picks``: how often DSGD chose each layer in the whole-step runs."""

    norm: str
    constants: str
    step_dsgd: float
    step_sgd: float
    whole_dsgd: float
    whole_sgd: float
    picks: list[int]


def make_mlp(in_features: int, width: int, depth: int, classes: int) -> nn.Sequential:
    """``depth`` Linear layers, ``Tanh`` between them, linear logits."""
    widths = [in_features] + [width] * (depth - 1) + [classes]
    modules: list[nn.Module] = []
    for k in range(depth):
        if k > 0:
            modules.append(nn.Tanh())
        modules.append(nn.Linear(widths[k], widths[k + 1]))
    return nn.Sequential(*modules)


def time_alternating(
    timed: list[Callable[[], object]],
    setups: list[Callable[[], object]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None],
) -> list[float]:
    """Median seconds of each ``timed[k]()``, run after its untimed ``setups[k]()``, the
    candidates interleaved call by call."""
    samples: list[list[float]] = [[] for _ in timed]
    for i in range(warmup + repeats):
        for k, (fn, setup) in enumerate(zip(timed, setups, strict=True)):
            setup()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                samples[k].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def measure(norm: str, constants: str, args: argparse.Namespace, device: torch.device, sync: Callable[[], None]) -> Row:
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, args.in_features, device=device)
    y = torch.randint(args.classes, (args.batch_size,), device=device)
    sgd_model = make_mlp(args.in_features, args.width, args.depth, args.classes).to(device)
    dsgd_model = copy.deepcopy(sgd_model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3)
    if constants == "data":
        dsgd = DSGD(dsgd_model, norm=norm, constants="data")
    else:
        ord_ = float("inf") if norm == "linf" else 2.0
        bound = torch.linalg.vector_norm(x, ord_, dim=1).max().item()
        dsgd = DSGD(dsgd_model, norm=norm, constants="architecture", data_bound=bound)

    def backward(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    def whole(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            backward(model, opt)
            opt.step()

        return run

    def record_input_norms() -> None:
        with torch.enable_grad():
            dsgd_model(x)

    def nothing() -> None:
        pass

    backward(sgd_model, sgd)
    backward(dsgd_model, dsgd)
    dsgd_setup = record_input_norms if constants == "data" else nothing
    step_dsgd, step_sgd = time_alternating(
        [dsgd.step, sgd.step], [dsgd_setup, nothing], args.warmup, args.repeats, sync
    )
    before = list(dsgd.selection_counts)
    whole_dsgd, whole_sgd = time_alternating(
        [whole(dsgd_model, dsgd), whole(sgd_model, sgd)], [nothing, nothing], args.warmup, args.repeats, sync
    )
    picks = [n - b for n, b in zip(dsgd.selection_counts, before, strict=True)]
    return Row(norm, constants, step_dsgd, step_sgd, whole_dsgd, whole_sgd, picks)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4, help="number of Linear layers")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--in-features", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.depth < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--depth and --repeats must be ≥ 1, --warmup ≥ 0")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False.")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__} | device {name} | threads {torch.get_num_threads()} | "
        f"MLP {'-'.join(map(str, [args.in_features] + [args.width] * (args.depth - 1) + [args.classes]))} tanh, "
        f"batch {args.batch_size} | median of {args.repeats} after {args.warmup} warmup"
        + (f" | OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if "OMP_WAIT_POLICY" in os.environ else "")
    )
    print(
        f"{'norm':<10} {'constants':<12} {'step DSGD':>10} {'step SGD':>9} {'ratio':>7}  "
        f"{'whole DSGD':>10} {'whole SGD':>9} {'ratio':>6}  DSGD picks per layer (whole step)"
    )
    rows = []
    for norm in NORMS:
        for constants in MODES:
            r = measure(norm, constants, args, device, sync)
            rows.append(r)
            print(
                f"{r.norm:<10} {r.constants:<12} {r.step_dsgd * 1e3:>8.3f}ms {r.step_sgd * 1e3:>7.3f}ms "
                f"{r.step_dsgd / r.step_sgd:>6.1f}x  {r.whole_dsgd * 1e3:>8.3f}ms {r.whole_sgd * 1e3:>7.3f}ms "
                f"{r.whole_dsgd / r.whole_sgd:>5.2f}x  {'/'.join(map(str, r.picks))}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
