"""Upper bounds on per-layer weight norms, kept across steps without recomputing them.

DSGD moves one layer per step by a step ``Δ`` whose norm it knows, so a norm ``ν ≥ ‖W‖`` (the
operator norms ``a_j`` of the certified constants, the weight norms of the adaptive trust region) can
follow the weight by the triangle inequality instead of another SVD::

    ‖fl(W + fl(Δ))‖ ≤ (ν + (1 + u√r)·‖Δ‖) / (1 − u√r)

(``u`` the unit roundoff of the parameter dtype, ``r`` the smaller side: each stored entry errs by
at most ``u`` relatively, and ``‖E‖ ≤ ‖E‖_F ≤ u ‖W'‖_F ≤ u√r ‖W'‖`` in every norm used here).
A value is recomputed exactly when the weight changed some other way (its version key moved), and
when the bound has grown more than ``tolerance`` beyond the last exact value — so it is never an
under-estimate and never looser than ``1 + tolerance`` times the last exact value plus the steps
since.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Entry:
    key: Hashable
    value: Tensor  # the bound ν
    exact: Tensor  # the last exactly computed value
    advanced: bool = False  # ν was moved by the triangle inequality since `exact`


class NormBounds:
    """``ν_i ≥ ‖W_i‖`` for layers ``i``; ``compute(indices)`` gives exact values (one tensor)."""

    def __init__(self, compute: Callable[[list[int]], Tensor], tolerance: float = 0.02) -> None:
        self._compute = compute
        self.tolerance = tolerance
        self._entries: dict[int, _Entry] = {}
        self.exact_computations = 0  # how many values were computed exactly (for tests and profiles)

    def values(self, indices: Sequence[int], keys: Sequence[Hashable]) -> list[Tensor]:
        """The bounds of ``indices`` whose weights now have version ``keys``; recomputes the stale
        ones (changed from outside, or grown past the tolerance) in one ``compute`` call."""
        key_of = dict(zip(indices, keys, strict=True))
        stale = [i for i, key in key_of.items() if i not in self._entries or self._entries[i].key != key]
        advanced = [i for i in indices if i not in stale and self._entries[i].advanced]
        if advanced:  # one host sync for all layers moved by the triangle inequality
            growth = torch.stack([self._entries[i].value / self._entries[i].exact for i in advanced]).tolist()
            stale += [i for i, g in zip(advanced, growth, strict=True) if not g <= 1.0 + self.tolerance]
        if stale:
            fresh = self._compute(stale)
            self.exact_computations += len(stale)
            for k, i in enumerate(stale):
                self._entries[i] = _Entry(key_of[i], fresh[k], fresh[k])
        return [self._entries[i].value for i in indices]

    def advance(
        self, index: int, before: Hashable, after: Hashable, step_norm: Tensor, dtype: torch.dtype, size: int
    ) -> None:
        """Record the step ``W ← W + Δ`` (``‖Δ‖ ≤ step_norm``, stored in ``dtype``, smaller side
        ``size``) taking the weight from version ``before`` to ``after``. A bound that was not
        current before the step is dropped (recomputed at next use)."""
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

    def snapshot(self) -> dict[int, tuple[Tensor, Tensor, bool]]:
        """The bounds as ``{index: (ν, last exact value, advanced)}`` (for checkpoints)."""
        return {i: (e.value, e.exact, e.advanced) for i, e in self._entries.items()}

    def restore(self, snapshot: dict[int, tuple[Tensor, Tensor, bool]], keys: dict[int, Hashable]) -> None:
        """Inverse of :meth:`snapshot`, for weights now at version ``keys`` (restored with them)."""
        self._entries = {
            int(i): _Entry(keys[int(i)], value, exact, advanced) for i, (value, exact, advanced) in snapshot.items()
        }
