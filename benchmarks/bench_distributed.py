"""What DSGD costs each rank of a 2-process run: memory and communication under FSDP2 against AdamW,
and the scoring time per rank under DDP against one process.

Real processes (``torch.multiprocessing``, spawned), ``gloo`` on CPU or ``nccl`` with one GPU per
rank (``--device cuda``), plain PyTorch (no Lightning), DSGD built as the Lightning integration
builds it: ``DSGD(model, reduce_max=all_reduce_max(), gather=all_gather_rows())``.

* **FSDP2**: a tanh MLP of equal widths, every ``Linear`` and the root under ``fully_shard``
  (parameters and gradients are ``DTensor`` shards). Per rank and per step, AdamW and DSGD alike:

  - *memory*: on CPU, ``RssMemory`` (the meter the target reads): the rise of the rank's peak
    resident set size over its RSS before the arm's model is built (``VmHWM``, reset at every phase
    through ``/proc/self/clear_refs``), every allocation of ``MMAP_THRESHOLD`` bytes or more its own
    mapping (``MALLOC_MMAP_THRESHOLD_``), so that it counts every tensor from its first write to its
    free, whichever thread frees it; beside it ``ProfiledMemory``: the bytes of every tensor Python
    holds at a phase's start plus the largest rise within the phase of the allocator's running sum (the torch profiler's
    memory events, ``profile_memory=True``; they include the workspaces inside kernels, and miss
    frees made on gloo's threads: the page reports how far the two disagree over a phase); on
    CUDA, ``torch.cuda``'s ``memory_allocated`` / ``max_memory_allocated``. Reported: what stays
    between steps (shards of parameters, gradients and optimizer state), the peak inside
    ``optimizer.step()`` and the peak over the whole step (zero_grad, forward, backward, step), each
    the largest over the measured steps;
  - *communication*: ``CollectiveBytes`` sees every
    collective at the dispatcher (``c10d`` ops from ``torch.distributed``, ``_c10d_functional`` ops
    from DTensor and functional collectives) and counts its payload: the gathered output of an
    all-gather, the full input of a reduce-scatter, the tensor of an all-reduce or broadcast, the
    input of an all-to-all. Bytes on the wire depend on the algorithm (a ring all-gather sends
    ``(w−1)/w`` of its output per rank); the payload is what the program asks to move. The check that
    it sees everything: FSDP2's own all-gathers in forward+backward sum to twice the parameters'
    bytes (gathered for the forward, again for the backward), its reduce-scatters to once.

* **DDP**: the same MLP family under ``DistributedDataParallel``, the global batch split over the
  ranks, against one process on the whole global batch: ``DSGD.score()`` (the scoring stage: every
  layer's gradient, dual norm, constant and the agreed choice) and ``DSGD.step()`` per rank, each
  call after a barrier, CPU time (``time.process_time``, the work whatever shares the cores) and wall
  time, mean over repeats that follow the same trajectory in every run. One thread per process.

When ``DSGD`` takes the ``share_work`` option (layers split among the ranks), both settings are
measured.
"""

from __future__ import annotations

import bisect
import gc
import inspect
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_common import mlp_widths
from examples.models import tanh_mlp
from lightning_dsgd import DSGD
from lightning_dsgd.distributed import all_gather_rows, all_reduce_max

#: The DSGD option that splits the layers among the ranks, measured on and off when present.
SHARE_OPTION = "share_work"
ADAMW_LR = 1e-4
MIB = 2.0**20


# ---------------------------------------------------------------------------------------------- bytes
#: Collectives that move no payload (or re-dispatch to a counted one).
_NOT_PAYLOAD = {"wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier", "recv_any_source_"}


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def payload_bytes(namespace: str, name: str, args: tuple, out: Any) -> int | None:
    """The payload of one collective per rank (``None``: not a counted collective).

    ``c10d`` ops take ``(tensors, …)`` or ``(outputs, inputs, …)``: the larger side is the gathered
    output or the scattered input. ``_c10d_functional`` ops return their result: the larger of
    inputs and result likewise."""
    if name in _NOT_PAYLOAD:
        return None
    if namespace == "c10d":
        return max(_nbytes(args[0]), _nbytes(args[1]) if len(args) > 1 else 0)
    if namespace == "_c10d_functional":
        return max(_nbytes(list(args)), _nbytes(out))
    return None


class CollectiveBytes(TorchDispatchMode):
    """Counts the payload bytes of every collective run while active, by ``phase`` (set by the caller)
    and op name (``c10d::allreduce_``, ``_c10d_functional::all_gather_into_tensor``, …)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        namespace = func.namespace
        if namespace in ("c10d", "_c10d_functional"):
            name = func._schema.name.split("::")[-1]
            size = payload_bytes(namespace, name, args, out)
            if size is not None:
                key = f"{namespace}::{name}"
                self.bytes[self.phase][key] += size
        return out


# ---------------------------------------------------------------------------------------------- memory
#: (peak bytes, bytes resident at the end, uncertainty of the peak) of a phase.
Memory = tuple[int, int, int]


def reachable_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of every tensor Python holds (a ``DTensor`` by its local
    shard). Between phases nothing else holds tensors (the autograd graph is freed by backward)."""
    storages: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, Tensor):
                    continue
                tensor = obj._local_tensor if isinstance(obj, DTensor) else obj
                if tensor.device.type == "cpu" and tensor.layout == torch.strided and not tensor.is_meta:
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except Exception:  # tensor subclasses without a storage
                continue
    return sum(storages.values())


class ProfiledMemory:
    """Peaks of CPU tensor memory per marked phase: the bytes Python holds at the phase's start
    (``reachable_tensor_bytes``) plus the largest rise of the allocator's running sum within it (the
    torch profiler's memory events, ``profile_memory=True``, which include the workspaces inside
    kernels). Two things blur it, both about one collective's buffers: the profiler misses frees made
    on other threads (gloo's workers may drop the tensors of finished collectives), and a tensor only
    C++ holds at a phase's start (a pending collective's) is not in the held bytes. The uncertainty
    reports how far they disagree: the largest ``|rise of the running sum − change of the held
    bytes|`` over a phase."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._exact: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> ProfiledMemory:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(*exc)

    @contextmanager
    def mark(self, name: str) -> Iterator[None]:
        """A phase; ``name`` must be unique (``prefix/step``)."""
        start = reachable_tensor_bytes()
        with torch.profiler.record_function(name):
            yield
        self._exact[name] = (start, reachable_tensor_bytes())

    def peaks(self, prefixes: tuple[str, ...]) -> dict[str, Memory]:
        """Per prefix, over the phases named ``prefix/…``: the largest peak, the bytes resident at the
        end of the last phase, the largest uncertainty."""
        events = self._profile.profiler.kineto_results.events()
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        times = [t for t, _ in memory]
        running = [0]
        for _, nbytes in memory:
            running.append(running[-1] + nbytes)
        spans = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in self._exact}
        out: dict[str, Memory] = {}
        for prefix in prefixes:
            peak, resident, drift = 0, 0, 0
            for name, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
                if not name.startswith(prefix + "/"):
                    continue
                first, last = bisect.bisect_left(times, begin), bisect.bisect_right(times, end)
                at_start, at_end = running[first], running[last]
                rise = max(running[first : last + 1]) - at_start
                exact_start, exact_end = self._exact[name]
                peak = max(peak, exact_start + rise)
                resident = exact_end
                drift = max(drift, abs((at_end - at_start) - (exact_end - exact_start)))
            out[prefix] = (peak, resident, drift)
        return out


#: glibc serves every allocation of at least this many bytes with its own ``mmap`` (and gives it
#: back with ``munmap`` when freed): set for the ranks, so that the resident set size follows the
#: tensors (torch's CPU allocator caches nothing).
MMAP_THRESHOLD = 128 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_meter_available() -> bool:
    """Linux with a resettable peak RSS (``/proc/self/clear_refs``, Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False


class _PhaseMeter:
    """Peak and current memory per marked phase (phases may nest: what is seen before an inner phase
    counts for every open one); a subclass reads ``_reading()`` (peak since the last reset, now) and
    resets its peak in ``_reset()``, both at every mark."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[int, int]] = {}
        self._open: list[str] = []

    def __enter__(self) -> _PhaseMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _reading(self) -> tuple[int, int]:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _fold(self) -> None:
        peak, now = self._reading()
        for prefix in self._open:
            self.found[prefix] = (max(self.found.get(prefix, (0, 0))[0], peak), now)
        self._reset()

    @contextmanager
    def mark(self, name: str) -> Iterator[None]:
        self._fold()
        self._open.append(name.rsplit("/", 1)[0])
        try:
            yield
        finally:
            self._fold()
            self._open.pop()

    def peaks(self, prefixes: tuple[str, ...]) -> dict[str, Memory]:
        return {p: (*self.found.get(p, (0, 0)), 0) for p in prefixes}


class RssMemory(_PhaseMeter):
    """The process's peak resident set size per marked phase, above its RSS when the meter was entered:
    the kernel's high-water mark ``VmHWM``, reset at each mark through ``/proc/self/clear_refs``. Every
    allocation of ``MMAP_THRESHOLD`` bytes or more is its own mapping in the ranks
    (``MALLOC_MMAP_THRESHOLD_``), so a tensor counts from its first write to its free, whichever
    thread frees it (gloo's included), at page granularity; small allocations reuse the heap (a few
    KiB of noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = 0

    def __enter__(self) -> RssMemory:
        self.base = _status_kib("VmRSS")
        return self

    def _reading(self) -> tuple[int, int]:
        return _status_kib("VmHWM") - self.base, _status_kib("VmRSS") - self.base

    def _reset(self) -> None:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")


class CudaMemory(_PhaseMeter):
    """``torch.cuda``'s allocator statistics per marked phase; exact, so no uncertainty."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def _reading(self) -> tuple[int, int]:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)

    def _reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DistConfig:
    """The runs: a tanh MLP ``width → … → width → classes`` of ``depth`` Linear layers, ``batch``
    rows per rank (the single-process run of the DDP comparison takes ``world × batch``)."""

    width: int = 1024
    depth: int = 6
    classes: int = 16
    batch: int = 64
    world: int = 2
    fsdp_steps: int = 3
    ddp_warmup: int = 1
    ddp_repeats: int = 5
    threads: int = 1

    def describe(self) -> str:
        widths = mlp_widths(self.width, self.width, self.depth, self.classes)
        return f"tanh MLP {'-'.join(map(str, widths))}, {self.batch} rows per rank"


def sharing_option() -> str | None:
    """``SHARE_OPTION`` when this checkout's DSGD takes it, else ``None``."""
    return SHARE_OPTION if SHARE_OPTION in inspect.signature(DSGD).parameters else None


def dsgd_arms() -> list[tuple[str, dict[str, Any]]]:
    option = sharing_option()
    if option is None:
        return [("DSGD", {})]
    return [(f"DSGD, {option}={value}", {option: value}) for value in (False, True)]


@dataclass
class FSDPArm:
    """Per rank: bytes resident between steps, peaks in the optimizer step and the whole step,
    the uncertainty of those peaks, payload bytes per step by phase and collective, and the median
    seconds of ``optimizer.step()`` (profiler and counter on)."""

    arm: str
    resident: list[int]
    optimizer_peak: list[int]
    step_peak: list[int]
    uncertainty: list[int]
    comm: list[dict[str, dict[str, float]]]
    step_seconds: list[float]
    #: CPU: the peak RSS meter's (``RssMemory``) resident, peak in step() and peak over the step per rank.
    rss_resident: list[int] = field(default_factory=list)
    rss_optimizer_peak: list[int] = field(default_factory=list)
    rss_step_peak: list[int] = field(default_factory=list)


@dataclass
class DDPArm:
    """Per rank: mean wall and CPU (``time.process_time``: every thread of the process) seconds of
    ``DSGD.score()`` and ``DSGD.step()``."""

    arm: str
    score_seconds: list[float]
    score_cpu: list[float]
    step_seconds: list[float]
    step_cpu: list[float]


@dataclass
class Distributed:
    config: DistConfig
    device: str
    option: str | None
    param_bytes: int  # the whole model's parameters, at full size (as FSDP2 pads them)
    fsdp: list[FSDPArm] = field(default_factory=list)
    ddp: list[DDPArm] = field(default_factory=list)
    single: DDPArm | None = None
    #: Per rank, what ``RssMemory`` read for a phase that wrote and freed ``RSS_CHECK_BYTES`` (CPU).
    rss_check: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the ranks
def _model(config: DistConfig, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    return tanh_mlp(mlp_widths(config.width, config.width, config.depth, config.classes)).to(device)


def _data(config: DistConfig, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, config.width, generator=g)
    y = torch.randint(0, config.classes, (rows,), generator=g)
    return x.to(device), y.to(device)


def padded_param_bytes(model: nn.Module, world: int) -> int:
    """Bytes of every parameter at full size, dim 0 padded to a multiple of ``world`` (FSDP2's shards)."""
    total = 0
    for p in model.parameters():
        rows = -(-p.shape[0] // world) * world
        total += rows * (p.numel() // max(p.shape[0], 1)) * p.element_size()
    return total


def _dsgd(model: nn.Module, kwargs: dict[str, Any], world: int) -> DSGD:
    if world > 1:
        return DSGD(model, reduce_max=all_reduce_max(), gather=all_gather_rows(), **kwargs)
    return DSGD(model, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fsdp_rank(rank: int, config: DistConfig, device: torch.device) -> dict[str, Any]:
    """Every arm in turn on this rank: memory, bytes per step and step time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (config.world,))
    x_all, y_all = _data(config, config.world * config.batch, device)
    mine = slice(rank * config.batch, (rank + 1) * config.batch)
    x, y = x_all[mine], y_all[mine]
    arms: list[tuple[str, dict[str, Any] | None]] = [("AdamW", None), *dsgd_arms()]
    results = []
    for arm, kwargs in arms:
        gc.collect()  # the previous arm's cycles (modules, hooks) are freed before this arm's window opens
        dist.barrier()
        meter: ProfiledMemory | CudaMemory = CudaMemory(device) if device.type == "cuda" else ProfiledMemory()
        rss = RssMemory() if device.type == "cpu" and rss_meter_available() else None
        meters = [m for m in (meter, rss) if m is not None]
        counter = CollectiveBytes()
        times = []
        with ExitStack() as entered:
            for m in meters:
                entered.enter_context(m)
            model = _model(config, device)
            for module in model:
                if isinstance(module, nn.Linear):
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if kwargs is None:
                optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, weight_decay=0.0)
            else:
                optimizer = _dsgd(model, kwargs, config.world)
            with counter:
                for step in range(1 + config.fsdp_steps):  # step 0: warm-up (AdamW allocates its state)
                    measured = step > 0
                    tag = "bench" if measured else "warmup"
                    with _marks(meters, f"{tag}-step/{step}"):
                        optimizer.zero_grad(set_to_none=True)
                        counter.phase = "forward_backward" if measured else "warmup"
                        loss = nn.functional.cross_entropy(model(x), y)
                        loss.backward()
                        counter.phase = "optimizer" if measured else "warmup"
                        with _marks(meters, f"{tag}-optimizer/{step}"):
                            _sync(device)
                            begin = time.perf_counter()
                            optimizer.step()
                            _sync(device)
                            seconds = time.perf_counter() - begin
                    if measured:
                        times.append(seconds)
            param_bytes = padded_param_bytes(model, config.world)
            del model, optimizer, loss, module  # a child under fully_shard holds the whole model
            gc.collect()
        peaks = meter.peaks(("bench-step", "bench-optimizer"))
        rss_peaks = rss.peaks(("bench-step", "bench-optimizer")) if rss is not None else None
        steps = config.fsdp_steps
        comm = {
            phase: {op: size / steps for op, size in ops.items()}
            for phase, ops in counter.bytes.items()
            if phase != "warmup"
        }
        results.append(
            {
                "arm": arm,
                "resident": peaks["bench-step"][1],
                "optimizer_peak": peaks["bench-optimizer"][0],
                "step_peak": peaks["bench-step"][0],
                "uncertainty": max(peaks["bench-step"][2], peaks["bench-optimizer"][2]),
                "comm": comm,
                "step_seconds": statistics.median(times),
                "rss": None
                if rss_peaks is None
                else [rss_peaks["bench-step"][1], rss_peaks["bench-optimizer"][0], rss_peaks["bench-step"][0]],
            }
        )
    return {"param_bytes": param_bytes, "arms": results, "rss_check": rss_check() if rss_meter_available() else None}


#: The temporary ``rss_check`` writes and frees.
RSS_CHECK_BYTES = 32 * 2**20


def rss_check() -> int:
    """The peak ``RssMemory`` reads for a phase that writes a ``RSS_CHECK_BYTES`` tensor and frees it."""
    meter = RssMemory()
    with meter, meter.mark("check/0"):
        temporary = torch.ones(RSS_CHECK_BYTES // 4)
        del temporary
    return meter.peaks(("check",))["check"][0]


@contextmanager
def _marks(meters: list, name: str) -> Iterator[None]:
    with ExitStack() as marked:
        for meter in meters:
            marked.enter_context(meter.mark(name))
        yield


def ddp_rank(rank: int, config: DistConfig, device: torch.device) -> dict[str, Any]:
    """``DSGD.score()`` and ``DSGD.step()`` per rank, arms interleaved call by call; ``world == 1``:
    one process on the whole global batch."""
    x_all, y_all = _data(config, config.world * config.batch, device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rows = len(x_all) // world
    x, y = x_all[rank * rows : (rank + 1) * rows], y_all[rank * rows : (rank + 1) * rows]
    arms = dsgd_arms() if world > 1 else [("DSGD, one process", {})]
    runs = []
    for _, kwargs in arms:
        model = _model(config, device)
        forward: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        runs.append((forward, _dsgd(model, kwargs, world)))

    def backward(forward: nn.Module, optimizer: DSGD) -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(forward(x), y).backward()

    def timed(call) -> tuple[float, float]:  # type: ignore[no-untyped-def]
        if world > 1:
            dist.barrier()
        _sync(device)
        begin, cpu = time.perf_counter(), time.process_time()
        call()
        _sync(device)
        return time.perf_counter() - begin, time.process_time() - cpu

    # Every run makes the same calls on the same gradients (DDP averages the ranks' into the global
    # batch's), so the weights follow one trajectory and the means over the repeats compare like with like.
    found: list[dict[str, list[float]]] = [defaultdict(list) for _ in arms]
    for repeat in range(config.ddp_warmup + config.ddp_repeats):
        for k, (forward, optimizer) in enumerate(runs):
            for name, call in (("score", optimizer.score), ("step", optimizer.step)):
                backward(forward, optimizer)
                seconds, cpu = timed(call)
                if repeat >= config.ddp_warmup:
                    found[k][f"{name}_seconds"].append(seconds)
                    found[k][f"{name}_cpu"].append(cpu)
    return {
        "arms": [
            {"arm": arm, **{key: statistics.fmean(values) for key, values in found[k].items()}}
            for k, (arm, _) in enumerate(arms)
        ]
    }


def both_rank(rank: int, config: DistConfig, device: torch.device) -> dict[str, Any]:
    """The FSDP2 runs, then the DDP runs, in one launch (processes are slow to start)."""
    return {"fsdp": fsdp_rank(rank, config, device), "ddp": ddp_rank(rank, config, device)}


#: One rank's part of a run: (rank, config, device) → a JSON-serialisable result.
Job = Callable[[int, DistConfig, torch.device], dict[str, Any]]


def _worker(rank: int, job: Job, config: DistConfig, device_name: str, port: int, world: int, out: str) -> None:
    torch.set_num_threads(config.threads)
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        result = job(rank, config, device)
        with open(os.path.join(out, f"{rank}.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle)
    except BaseException:
        # Printed before the process group goes: tearing it down with the other rank still inside a
        # collective can abort the process before spawn reports the exception.
        traceback.print_exc()
        sys.stderr.flush()
        if world > 1:
            dist.destroy_process_group()
        raise
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    # The result is written. Leave without the interpreter's C++ teardown: it aborted once in CI after
    # a gloo + DTensor job had returned ("terminate called without an active exception", in torch's
    # statics at exit; tests/lightning/plain_fsdp_run.py met the same), failing a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(job: Job, config: DistConfig, device_name: str, world: int) -> list[dict[str, Any]]:
    """Run ``job`` (a module-level function: it is pickled by name) in ``world`` spawned processes,
    in a process group when ``world > 1``; return each rank's result, in rank order."""
    import torch.multiprocessing as mp

    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by glibc as each rank starts (RssMemory)
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(
                _worker,
                args=(job, config, device_name, free_port(), world, out),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
            results = []
            for rank in range(world):
                with open(os.path.join(out, f"{rank}.json"), encoding="utf-8") as handle:
                    results.append(json.load(handle))
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return results


def check_devices(config: DistConfig, device_name: str) -> None:
    """Refuse a CUDA run with fewer GPUs than ranks (the harness calls it before any section runs)."""
    if torch.device(device_name).type == "cuda" and torch.cuda.device_count() < config.world:
        raise SystemExit(
            f"the distributed section needs {config.world} GPUs (one per rank), found {torch.cuda.device_count()}: "
            "run it on CPU (gloo) or on a machine with more GPUs, or leave 'distributed' out of --sections."
        )


def measure_distributed(config: DistConfig, device_name: str = "cpu") -> Distributed:
    """The FSDP2 and DDP runs of ``config.world`` processes, and the single-process run."""
    check_devices(config, device_name)
    device = torch.device(device_name)
    ranks = launch(both_rank, config, device_name, config.world)
    fsdp, ddp = [r["fsdp"] for r in ranks], [r["ddp"] for r in ranks]
    single = launch(ddp_rank, config, device_name, 1)[0]["arms"][0]
    result = Distributed(config, device.type, sharing_option(), fsdp[0]["param_bytes"])
    result.rss_check = [r["rss_check"] for r in fsdp if r.get("rss_check") is not None]
    for k, first in enumerate(fsdp[0]["arms"]):
        ranks = [r["arms"][k] for r in fsdp]
        result.fsdp.append(
            FSDPArm(
                first["arm"],
                [r["resident"] for r in ranks],
                [r["optimizer_peak"] for r in ranks],
                [r["step_peak"] for r in ranks],
                [r["uncertainty"] for r in ranks],
                [r["comm"] for r in ranks],
                [r["step_seconds"] for r in ranks],
                *([r["rss"][k] for r in ranks] if all(r.get("rss") for r in ranks) else [] for k in range(3)),
            )
        )
    for k, first in enumerate(ddp[0]["arms"]):
        ranks = [r["arms"][k] for r in ddp]
        result.ddp.append(DDPArm(first["arm"], *([r[key] for r in ranks] for key in DDP_KEYS)))
    result.single = DDPArm(single["arm"], *([single[key]] for key in DDP_KEYS))
    return result


DDP_KEYS = ("score_seconds", "score_cpu", "step_seconds", "step_cpu")


# ---------------------------------------------------------------------------------------------- the page
def _mib(value: float) -> str:
    mib = value / MIB
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}" if mib >= 10 else f"{mib:.2f}"


def _per_rank(values: list[float]) -> str:
    return " / ".join(_mib(v) for v in values)


def comm_bytes(arm: FSDPArm, phase: str | None = None, op: str | None = None) -> float:
    """Payload bytes per step, the largest over the ranks, of one phase and op family (``None``: all)."""
    found = []
    for rank in arm.comm:
        total = 0.0
        for p, ops in rank.items():
            if phase is None or p == phase:
                total += sum(v for name, v in ops.items() if op is None or op in name)
        found.append(total)
    return max(found)


def work_key(result: Distributed) -> str:
    """What measures work per rank: CPU time on CPU (immune to ranks sharing cores), wall time on CUDA."""
    return "score_seconds" if result.device == "cuda" else "score_cpu"


def distributed_section(result: Distributed) -> list[str]:
    """The distributed section of the page: tables, the communication check and the targets."""
    from benchmarks.bench_report import ms, ratio

    config = result.config
    adamw = result.fsdp[0]
    if result.device == "cuda":
        memory = "`torch.cuda.memory_allocated` / `max_memory_allocated` per phase (exact)"
    else:
        uncertainty = max(max(arm.uncertainty) for arm in result.fsdp)
        memory = (
            "the bytes of every tensor Python holds at a phase's start plus the largest rise of the allocator's "
            "running sum within it (torch profiler, `profile_memory=True`; it sees the workspaces inside kernels). "
            "The profiler misses frees made on gloo's threads, and a tensor that only a pending collective holds "
            "at a phase's start is not among the held bytes: over a phase the two disagreed by up to "
            f"{_mib(uncertainty)} MiB here, so read the peaks as ± that"
        )
    backend = "nccl" if result.device == "cuda" else "gloo, CPU"
    option = (
        f"DSGD splits the layers among the ranks when `{result.option}=True`; both settings are measured."
        if result.option
        else f"This DSGD has no `{SHARE_OPTION}` option: every rank gathers every full gradient and scores every layer."
    )
    rss = all(arm.rss_step_peak for arm in result.fsdp)
    rss_text = (
        " **Peak RSS** (the meter the target reads on CPU): the rise of the rank's peak resident set size "
        "over its RSS before the run's model was built (Linux `VmHWM`, reset at each phase through "
        "`/proc/self/clear_refs`), glibc serving every allocation of "
        f"{MMAP_THRESHOLD // 1024} KiB or more from its own mapping (`MALLOC_MMAP_THRESHOLD_`), so that a "
        "tensor counts from its first write until it is freed, by any thread, at page granularity; "
        f"small allocations add a little noise: a phase that wrote and freed {_mib(RSS_CHECK_BYTES)} MiB read "
        f"{_per_rank(result.rss_check)} MiB on the ranks."
        if rss and result.rss_check
        else ""
    )
    lines = [
        "## Distributed: memory and communication per rank",
        "",
        f"{config.world} processes ({backend}, {config.threads} thread each), plain PyTorch, DSGD built as the "
        "Lightning integration builds it (default settings, `reduce_max` and `gather` over the ranks). " + option,
        "",
        f"**FSDP2** ({config.describe()}; every `Linear` and the root under `fully_shard`; "
        f"{config.fsdp_steps} measured step{'s' if config.fsdp_steps != 1 else ''} after one warm-up; parameters "
        f"{_mib(result.param_bytes)} MiB at full size), AdamW against DSGD. Memory per rank (MiB, rank 0 / rank 1): "
        "*resident* between steps (shards of parameters, gradients, optimizer state), the peak inside "
        "`optimizer.step()`, the peak over the whole step (zero_grad, forward, backward, step), from "
        f"{memory}.{rss_text} Communication: payload bytes per step and "
        "rank of every collective seen at the dispatcher (the gathered output of an all-gather, the full input of "
        "a reduce-scatter, the tensor of an all-reduce or broadcast), the largest over the ranks.",
        "",
        "| optimizer | resident | peak in step() | peak, whole step | × AdamW | "
        + ("peak RSS in step() | peak RSS, whole step | × AdamW | " if rss else "")
        + "moved in fwd+bwd (MiB) | moved in step() (MiB) | total (MiB) | × AdamW | step() (ms) |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if rss else "") + "---:|---:|---:|---:|---:|",
    ]
    for arm in result.fsdp:
        total = comm_bytes(arm)
        rss_cells = (
            f"{_per_rank(arm.rss_optimizer_peak)} | {_per_rank(arm.rss_step_peak)} | "
            f"{ratio(max(arm.rss_step_peak), max(adamw.rss_step_peak))} | "
            if rss
            else ""
        )
        lines.append(
            f"| {arm.arm} | {_per_rank(arm.resident)} | {_per_rank(arm.optimizer_peak)} | "
            f"{_per_rank(arm.step_peak)} | {ratio(max(arm.step_peak), max(adamw.step_peak))} | {rss_cells}"
            f"{_mib(comm_bytes(arm, 'forward_backward'))} | {_mib(comm_bytes(arm, 'optimizer'))} | {_mib(total)} | "
            f"{ratio(total, comm_bytes(adamw))} | {ms(max(arm.step_seconds))} |"
        )
    gathered = comm_bytes(adamw, "forward_backward", "allgather")
    scattered = comm_bytes(adamw, "forward_backward", "reduce_scatter")
    lines += [
        "",
        f"Check of the byte counter: FSDP2's own all-gathers in forward+backward move {_mib(gathered)} MiB per step "
        f"({gathered / result.param_bytes:.3f} × the parameters, expected 2: forward and backward), its "
        f"reduce-scatters {_mib(scattered)} MiB ({scattered / result.param_bytes:.3f} ×, expected 1). "
        "`step()` times are medians taken with the profiler and the counter on.",
        "",
    ]
    if result.single is not None and result.ddp:
        single = result.single
        rows = config.world * config.batch

        def cells(arm: DDPArm, key: str) -> str:
            values = getattr(arm, key)
            return f"{' / '.join(ms(v) for v in values)} | {ratio(max(values), getattr(single, key)[0])}"

        keys = ("score_cpu", "score_seconds", "step_cpu", "step_seconds")
        lines += [
            f"**DDP** ({config.describe()}, {rows} rows in all) against one process on the same {rows} rows: "
            "`DSGD.score()` (every layer's gradient, dual norm, constant and the agreed choice) and `DSGD.step()` "
            "per rank (rank 0 / rank 1), each call after a barrier and on fresh gradients, mean over "
            f"{config.ddp_repeats} repeats after {config.ddp_warmup} warm-up. *CPU*: `time.process_time` of the "
            "rank's process, its communication threads included (the work it does, whatever else shares the "
            "cores); *wall*: `time.perf_counter` (on a machine with fewer free cores than ranks the ranks share "
            "them, which inflates it).",
            "",
            "| optimizer | score() CPU (ms) | × one process | score() wall (ms) | × one process | "
            "step() CPU (ms) | × one process | step() wall (ms) | × one process |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {single.arm} | " + " | ".join(cells(single, key) for key in keys) + " |",
            *(f"| {arm.arm} | " + " | ".join(cells(arm, key) for key in keys) + " |" for arm in result.ddp),
            "",
        ]
    lines += distributed_verdicts(result)
    return lines


def distributed_verdicts(result: Distributed) -> list[str]:
    """The targets of the distributed work, each with its measured ratio."""
    adamw = result.fsdp[0]
    lines = ["Targets:", ""]
    rss = all(arm.rss_step_peak for arm in result.fsdp)
    for arm in result.fsdp[1:]:
        share = max(arm.rss_step_peak) / max(adamw.rss_step_peak) if rss else max(arm.step_peak) / max(adamw.step_peak)
        lines.append(
            f"- FSDP2 peak memory per rank ≤ AdamW's{' (peak RSS)' if rss else ''}: {arm.arm} {share:.2f}× "
            f"({'met' if share <= 1.0 else 'not met'}); bytes per step {comm_bytes(arm) / comm_bytes(adamw):.2f}× "
            "AdamW's."
        )
    if result.single is not None:
        key = work_key(result)
        what = "CPU time" if key == "score_cpu" else "wall time"
        for arm in result.ddp:
            share = max(getattr(arm, key)) / getattr(result.single, key)[0]
            lines.append(
                f"- Per-rank scoring work about 1/{result.config.world} of one process's: {arm.arm} {share:.2f}× "
                f"({what} of `score()`, the busier rank; target ≈ {1 / result.config.world:.2f}×)."
            )
    return [*lines, ""]


if __name__ == "__main__":  # a quick look: python -m benchmarks.bench_distributed
    found = measure_distributed(DistConfig(width=128, depth=4, batch=32, fsdp_steps=2, ddp_repeats=3))
    print("\n".join(distributed_section(found)))
