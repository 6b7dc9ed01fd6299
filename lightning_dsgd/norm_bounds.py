"""Upper bounds on per-layer weight norms, kept across steps without recomputing them.

DSGD moves each layer it updates by a step ``Δ`` whose norm it knows, so a norm ``ν ≥ ‖W‖`` (the
operator norms ``a_j`` of the certified constants, the weight norms of the adaptive trust region) can
follow the weight by the triangle inequality instead of another SVD::

    ‖fl(W + fl(Δ))‖ ≤ (ν + (1 + u√r)·‖Δ‖) / (1 − u√r)

(``u`` the unit roundoff of the parameter dtype, ``r`` the smaller side: each stored entry errs by
at most ``u`` relatively, and ``‖E‖ ≤ ‖E‖_F ≤ u ‖W'‖_F ≤ u√r ‖W'‖`` in every norm used here).
A value is recomputed exactly when the weight changed some other way (its version key moved), and
when the bound has grown more than ``tolerance`` beyond the last exact value — so it is never an
under-estimate and never looser than ``1 + tolerance`` times the last exact value plus the steps
since.

The growth check reads the bounds on the host without a device synchronisation of its own: on
the CPU it reads them at once (host memory), elsewhere the ratios are copied to the host
asynchronously at one call and read at the next (by then the step that followed has
synchronised), so there a bound past the tolerance is recomputed one call late — still an upper
bound, looser by at most one more step.

Under shared work ([lightning_dsgd.plan][]) the exact values are not computed by every rank:
[due][lightning_dsgd.norm_bounds.NormBounds.due] says which are due (the same on every rank, from
the same bounds and versions), each layer's owner computes its own, the values travel in the
step's one collective and [provide][lightning_dsgd.norm_bounds.NormBounds.provide] hands them to
the next ``values`` call, so that every rank holds the same bounds.

A checkpoint carries the bounds
([`NormBounds.state_dict`][lightning_dsgd.norm_bounds.NormBounds.state_dict]), so that a resumed
run uses the same constants as an uninterrupted one; a loaded bound is adopted at its first use as
``max(saved ν, exact value)`` — the saved one for the checkpoint's own weights, and still an upper
bound for any other weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dsgd.distributed import full


def _copy_to_host(values: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    """Start copying ``values`` to the host without waiting (into pinned memory); on CUDA the
    event marks when the copy is done (elsewhere the next step's own synchronisation does)."""
    if values.device.type == "cpu":
        return values, None
    host = values.to("cpu", non_blocking=True)
    if values.device.type != "cuda":
        return host, None
    event = torch.cuda.Event()
    event.record()
    return host, event


def _read_copied(host: Tensor, event: torch.cuda.Event | None) -> list[float]:
    """The values of a copy made by `_copy_to_host` (waits for it only if it is still running,
    which a step's own synchronisation since then rules out)."""
    if event is not None:
        event.synchronize()
    return host.tolist()


@dataclass
class _Entry:
    key: Hashable
    value: Tensor  # the bound ν
    exact: Tensor  # the last exactly computed value
    advanced: bool = False  # ν was moved by the triangle inequality since `exact`


#: Exact values of layers ``indices`` from the full tensors each reads (``tensors[k]`` for ``indices[k]``).
Exact = Callable[[list[int], list[list[Tensor]]], Tensor]


class NormBounds:
    """``ν_i ≥ ‖W_i‖`` for layers ``i``; ``compute(indices)`` gives exact values (one tensor). Or,
    so that each layer's owner can compute its own ([lightning_dsgd.plan][]), ``reads(i)``: the
    parameters (detached, maybe sharded) layer ``i``'s value reads, and ``exact``: the values from
    their full tensors; ``compute`` is then ``exact`` on the full tensors."""

    def __init__(
        self,
        compute: Callable[[list[int]], Tensor] | None = None,
        tolerance: float = 0.02,
        *,
        reads: Callable[[int], list[Tensor]] | None = None,
        exact: Exact | None = None,
    ) -> None:
        if compute is None:
            assert reads is not None and exact is not None, "NormBounds needs compute, or reads and exact"
            compute = lambda indices: exact(indices, [[full(t) for t in reads(i)] for i in indices])  # noqa: E731
        self._compute = compute
        self.reads = reads
        self.exact = exact
        self.tolerance = tolerance
        self._entries: dict[int, _Entry] = {}
        self._growth: tuple[list[tuple[int, _Entry]], Tensor, torch.cuda.Event | None] | None = None
        self._loaded: dict[int, _Entry] = {}  # from a checkpoint, until first use
        self._due: tuple[tuple, list[int]] | None = None  # `due`'s answer, for the next `values`
        self._provided: dict[int, Tensor] = {}  # exact values computed by the layers' owners
        self.exact_computations = 0  # how many values were computed exactly (for tests and profiles)

    def values(self, indices: Sequence[int], keys: Sequence[Hashable]) -> list[Tensor]:
        """The bounds of ``indices`` whose weights now have version ``keys``; recomputes the stale
        ones (changed from outside, or grown past the tolerance) in one ``compute`` call (or takes
        them from [provide][lightning_dsgd.norm_bounds.NormBounds.provide])."""
        key_of = dict(zip(indices, keys, strict=True))
        self._refresh(self._take_due(indices, keys), key_of)
        advanced = [i for i in indices if self._entries[i].advanced]
        if advanced and self._device_type() != "cpu":  # read at the next call, without a host sync now
            growth = torch.stack([self._entries[i].value / self._entries[i].exact for i in advanced])
            self._growth = ([(i, self._entries[i]) for i in advanced], *_copy_to_host(growth))
        return [self._entries[i].value for i in indices]

    def due(self, indices: Sequence[int], keys: Sequence[Hashable]) -> list[int]:
        """The layers whose exact value the next ``values(indices, keys)`` needs: unknown, changed
        from outside (their version moved), or grown past the tolerance (on the CPU checked now,
        elsewhere at the previous call). The same on every rank that holds the same bounds."""
        if self._due is not None and self._due[0] == (tuple(indices), tuple(keys)):
            return list(self._due[1])
        key_of = dict(zip(indices, keys, strict=True))
        stale = [i for i, key in key_of.items() if i not in self._entries or self._entries[i].key != key]
        stale += [i for i in self._outgrown() if i in key_of and i not in stale]
        if self._device_type() == "cpu":  # host memory: reading the growth now synchronises no device
            current = [i for i in key_of if i not in stale and self._entries[i].advanced]
            loaded = [i for i in stale if i in self._loaded and self._loaded[i].advanced]
            growth = [self._entries[i] for i in current] + [self._loaded[i] for i in loaded]
            if growth:
                ratios = torch.stack([e.value / e.exact for e in growth]).tolist()
                outgrown = [i for i, g in zip(current + loaded, ratios, strict=True) if not g <= 1.0 + self.tolerance]
                for i in outgrown:  # a saved bound past the tolerance is recomputed: drop it
                    self._loaded.pop(i, None)
                stale += [i for i in outgrown if i not in stale]
        self._due = ((tuple(indices), tuple(keys)), stale)
        return list(stale)

    def provide(self, fresh: Mapping[int, Tensor]) -> None:
        """Exact values of due layers computed elsewhere (by their owners), for the next ``values``."""
        self._provided = dict(fresh)

    def _take_due(self, indices: Sequence[int], keys: Sequence[Hashable]) -> list[int]:
        stale = self.due(indices, keys)
        self._due = None
        return stale

    def _device_type(self) -> str:
        for entry in (*self._entries.values(), *self._loaded.values()):
            return entry.value.device.type
        return "cpu"

    def _refresh(self, stale: list[int], key_of: dict[int, Hashable]) -> None:
        """Compute the bounds of ``stale`` exactly (one ``compute`` call); a bound loaded from a
        checkpoint is adopted as ``max(saved, exact)``."""
        provided, self._provided = self._provided, {}
        if not stale:
            return
        missing = [i for i in stale if i not in provided]
        computed = dict(zip(missing, self._compute(missing) if missing else [], strict=True))
        self.exact_computations += len(stale)
        for i in stale:
            fresh = provided[i] if i in provided else computed[i]
            entry = self._loaded.pop(i, None)
            if entry is None:
                self._entries[i] = _Entry(key_of[i], fresh, fresh)
                continue
            # max(saved ν, exact), on the device: the saved bound for the checkpoint's own weights
            saved = entry.value.to(fresh.dtype) >= fresh
            value = torch.where(saved, entry.value.to(fresh.dtype), fresh)
            exact = torch.where(saved, entry.exact.to(fresh.dtype), fresh)
            self._entries[i] = _Entry(key_of[i], value, exact, entry.advanced)

    def _outgrown(self, consume: bool = True) -> list[int]:
        """The layers whose bound had grown past the tolerance at the previous call (and whose
        entry is still the one measured then)."""
        if self._growth is None:
            return []
        measured, host, event = self._growth
        if consume:
            self._growth = None
        growth = _read_copied(host, event)
        return [
            i
            for (i, entry), g in zip(measured, growth, strict=True)
            if self._entries.get(i) is entry and not g <= 1.0 + self.tolerance
        ]

    def state_dict(self) -> dict[int, dict]:
        """Every bound with its last exact value, and whether it is due for recomputation."""
        outgrown = set(self._outgrown(consume=False))
        state = {
            i: {"value": e.value, "exact": e.exact, "advanced": e.advanced, "outgrown": i in outgrown}
            for i, e in self._entries.items()
        }
        state.update({i: vars(e) | {"outgrown": False} for i, e in self._loaded.items() if i not in state})
        return state

    def load_state_dict(self, state: dict[int, dict], device: torch.device) -> None:
        """The bounds of [`state_dict`][lightning_dsgd.norm_bounds.NormBounds.state_dict], each
        adopted at its first use (see the module docstring)."""
        self._entries, self._growth, self._due, self._provided = {}, None, None, {}
        self._loaded = {
            int(i): _Entry(None, s["value"].to(device, copy=True), s["exact"].to(device, copy=True), s["advanced"])
            for i, s in state.items()
            if not s["outgrown"]
        }

    def advance(
        self, index: int, before: Hashable, after: Hashable, step_norm: Tensor, dtype: torch.dtype, size: int
    ) -> None:
        """Record the step ``W ← W + Δ`` (``‖Δ‖ ≤ step_norm``, stored in ``dtype``, smaller side
        ``size``) taking the weight from version ``before`` to ``after``. A bound that was not
        current before the step is dropped (recomputed at next use)."""
        self._due, self._provided = None, {}
        entry = self._entries.get(index)
        if entry is None or entry.key != before:
            self._entries.pop(index, None)
            return
        rounding = torch.finfo(dtype).eps / 2 * math.sqrt(size)
        if rounding >= 1.0:
            self._entries.pop(index, None)
            return
        entry.value = (entry.value + (1.0 + rounding) * step_norm.to(entry.value.dtype)) / (1.0 - rounding)
        entry.key = after
        entry.advanced = True
