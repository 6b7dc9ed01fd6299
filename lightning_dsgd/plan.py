"""Who does which part of a DSGD step: ``WorkPlan``, beside the maths of `lightning_dsgd.optimizer`.

Every rank takes the same decision from the same numbers; the plan only says where each number
is computed and how it travels.

* **Replicated** (one process, or ``share_work=False``): every rank scores every layer on full
  gradients ([full][lightning_dsgd.distributed.full]); the step's decision row of every rank is
  all-gathered, rank 0's is taken and a rank whose own greedy choice or finiteness differs raises.
* **Shared** (several ranks): layer ``i`` has one owner, from a greedy longest-processing-time
  split of the cost ``m·n·min(m, n)`` (spectral blocks, an SVD) or ``m·n`` (the others), the
  same on every rank. The owner alone obtains the layer's full gradient (under FSDP2 a
  ``gather`` of the dim-0 shards to it; under DDP every rank holds it already), one layer at a
  time (`each_gradient`, in `rounds`: every rank's first layer, then every rank's second, …, so
  that the ranks work side by side between the collectives): it measures the adaptive
  curvature along the layer's pending step (which is then released), scores it and, when several
  layers move per step, computes its direction ``ρ`` (``⟨g, ρ⟩`` comes from the scores), then
  drops the gradient, so that at most one gathered full
  gradient is alive on a rank and each owned layer holds at most one full block at a time (its
  pending step, then its direction, then its new step). With one layer per step the moving
  layer's gradient is obtained again for its step. The exact weight norms that fall due (which
  do follows from bounds every rank holds alike, `lightning_dsgd.norm_bounds`) are spread over
  the ranks, the costliest first to the least loaded (`norm_owners`: scoring work and earlier
  norms counted), each computed by one rank (under FSDP2 from the weight gathered to it only).
  Those per-layer values travel in the step's ONE all-gather, every rank reads each value from
  the row of the rank that computed it, computes the same constants and the same argmax. The
  step of a layer that moves is computed by its owner. Under DDP it is broadcast (with
  ``⟨g, Δ⟩`` for the adaptive constants), so every rank applies it and keeps the same state.
  Under FSDP2 each rank receives only its own dim-0 shard (a ``scatter``); the owner alone keeps
  the whole step for the adaptive curvature at the next step (which then travels in the
  all-gather), and saving the state broadcasts the kept steps, so that every rank's state, and
  the checkpoint rank 0 writes, is complete.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dsgd.distributed import Gatherer, full, is_sharded, local
from lightning_dsgd.geometry import BlockGrad, reduction_dtype
from lightning_dsgd.layers import Layer
from lightning_dsgd.norm_bounds import NormBounds


def layer_cost(rows: int, cols: int, norm: str) -> int:
    """Work to score one ``rows × cols`` block: an SVD for the spectral norm, one pass otherwise."""
    return rows * cols * min(rows, cols) if norm == "spectral" else rows * cols


def balanced_owners(costs: Sequence[int], world: int) -> tuple[int, ...]:
    """Greedy longest-processing-time: the costliest layer first, each to the least-loaded rank
    (ties to the lower index and rank), so that every rank computes the same split."""
    loads = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return tuple(owners)


def norm_owners(due_costs: Sequence[int], loads: Sequence[int]) -> tuple[int, ...]:
    """The rank that computes each due exact norm this step: the costliest first, each to the rank
    least loaded so far (``loads``: each rank's scoring work; ties to the lower index and rank), so
    that every rank, holding the same ``due`` list, makes the same assignment."""
    loads = list(loads)
    owners = [0] * len(due_costs)
    for k in sorted(range(len(due_costs)), key=lambda k: (-due_costs[k], k)):
        rank = min(range(len(loads)), key=lambda r: (loads[r], r))
        owners[k] = rank
        loads[rank] += due_costs[k]
    return tuple(owners)


def rounds(owners: Sequence[int], world: int) -> Iterator[list[int]]:
    """The items in rounds: round ``r`` holds each rank's ``r``-th item (``owners[k]``: item ``k``'s
    rank; ranks in order, each rank's items in index order). Collectives issued round by round let
    every rank work on its own item while the others work on theirs; in index order a rank would
    wait at the next item's collective for every earlier item's owner to finish its work."""
    queues = [[k for k, owner in enumerate(owners) if owner == rank] for rank in range(world)]
    for r in range(max(map(len, queues), default=0)):
        yield [queue[r] for queue in queues if r < len(queue)]


def process_group_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group (``(0, 1)`` without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class WorkPlan:
    """Owner rank of every layer, and this rank's counters of the last step's work.

    ``owners[i]`` is the rank whose row carries layer ``i``'s values (all 0 when replicated)."""

    owners: tuple[int, ...]
    rank: int = 0
    world: int = 1
    shared: bool = False
    device: torch.device | None = None  # where steps are received
    #: Work of each layer's scoring or exact norm (`layer_cost`); empty when replicated.
    costs: tuple[int, ...] = ()
    #: Layers this rank scored (dual norm, and its SVD where spectral) in the last step.
    layers_scored: int = 0
    #: Full gradients this rank assembled from shards in the last step, and their bytes.
    gradients_gathered: int = 0
    gathered_bytes: int = 0
    #: The most full gradients assembled from shards alive at once on this rank in the last step.
    most_gradients_alive: int = 0
    #: Shared work: the layers whose exact weight norms this rank computed in the last step.
    norms_computed: list[int] = field(default_factory=list)
    _owner_index: Tensor | None = field(default=None, repr=False)
    _alive: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)
    #: Exact-norm work each rank did beyond the least busy one, over the steps so far (the same on every rank).
    _norm_work: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def replicated(cls, n: int) -> WorkPlan:
        rank, world = process_group_size()
        return cls((0,) * n, rank, world)

    @classmethod
    def balanced(cls, layers: Sequence[Layer], shapes: Sequence[Sequence[int]]) -> WorkPlan:
        rank, world = process_group_size()
        costs = [layer_cost(rows, cols, layer.norm) for layer, (rows, cols) in zip(layers, shapes, strict=True)]
        for layer in layers:
            _check_shardable(layer, world)
        device = layers[0].weight.device
        return cls(balanced_owners(costs, world), rank, world, shared=world > 1, device=device, costs=tuple(costs))

    def owns(self, index: int) -> bool:
        """Whether this rank scores layer ``index`` (and computes its direction)."""
        return not self.shared or self.owners[index] == self.rank

    # ------------------------------------------------------------------ gradients
    def gradients(self, layers: Sequence[Layer]) -> list[BlockGrad]:
        """Replicated: every layer's gradient as a ``(W, b)`` pair of full matrices (``None`` for a
        layer without a gradient)."""
        self._start_step()
        grads = [self.gradient(layer, i) for i, layer in enumerate(layers)]
        self.layers_scored = sum(1 for g in grads if g is not None)
        return grads

    def each_gradient(self, layers: Sequence[Layer]) -> Iterator[tuple[int, tuple[Tensor, Tensor | None]]]:
        """Shared: ``(i, (W, b))`` for each layer this rank scores, one at a time, its full gradient
        obtained only when its turn comes: in rounds (`rounds`), round ``r`` obtaining each rank's
        ``r``-th layer (under FSDP2 every rank takes part in every layer's ``gather``, in the same
        order), so that the ranks then score their layers side by side. The caller drops each before
        asking for the next, so at most one gathered gradient is alive on a rank
        (``most_gradients_alive`` counts them)."""
        self._start_step()
        for batch in rounds(self.owners, self.world):
            mine = None
            for i in batch:
                grad = self.gradient(layers[i], i)
                if grad is not None:  # on the owner only
                    self.layers_scored += 1
                    mine = i, grad
                del grad
            if mine is not None:
                yield mine
            del mine

    def _start_step(self) -> None:
        self.layers_scored = self.gradients_gathered = self.gathered_bytes = 0
        self.most_gradients_alive = len(self._alive)

    def gradient(self, layer: Layer, index: int) -> BlockGrad:
        """Layer ``index``'s gradient as a ``(W, b)`` pair of full matrices on the rank that scores
        it (``None`` elsewhere, and without a gradient); a collective under FSDP2 with shared work."""
        if layer.weight.grad is None:
            return None
        bias = layer.bias
        if bias is not None:
            bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        if not self.shared:
            weight = layer.weight_matrix(full(layer.weight.grad))
            return weight, None if bias is None else layer.bias_vector(full(bias_grad))
        owner = self.owners[index]
        parts = [layer.weight.grad] + ([] if bias is None else [bias_grad])
        if is_sharded(layer.weight.grad):
            gathered = [self._gather(part, owner) for part in parts]
        else:
            gathered = parts if owner == self.rank else [None]
        if gathered[0] is None:
            return None
        if any(is_sharded(p) for p in parts):
            self.gradients_gathered += 1
            self.gathered_bytes += sum(g.numel() * g.element_size() for g in gathered)
            self._alive.add(gathered[0]._base if gathered[0]._base is not None else gathered[0])
            self.most_gradients_alive = max(self.most_gradients_alive, len(self._alive))
        weight = layer.weight_matrix(gathered[0])
        return weight, None if bias is None else layer.bias_vector(gathered[1])

    def _gather(self, grad: Tensor, owner: int) -> Tensor | None:
        """The full tensor of a dim-0 sharded ``grad`` on ``owner`` (``None`` on the other ranks):
        each rank's shard, padded to the chunk size, is gathered to the owner only."""
        shard = local(grad)
        rows = grad.shape[0]
        chunk = math.ceil(rows / self.world)
        padded = shard.new_zeros((chunk, *shard.shape[1:]))
        padded[: shard.shape[0]] = shard
        # The owner receives into one buffer: every shard but the last ones is full, so its first
        # ``rows`` rows are the tensor.
        whole = padded.new_empty((chunk * self.world, *shard.shape[1:])) if self.rank == owner else None
        dist.gather(padded, None if whole is None else list(whole.split(chunk)), dst=owner)
        return None if whole is None else whole[:rows]

    # ------------------------------------------------------------------ exact weight norms
    def exact_norms(self, due: Sequence[tuple[NormBounds, list[int]]]) -> Tensor | None:
        """Shared: the exact values of the ``due`` layers of each bounds (see
        [NormBounds.due][lightning_dsgd.norm_bounds.NormBounds.due], the same on every rank), each
        computed by one rank, the costliest first to the least loaded (its scoring work and the
        norms it computed in earlier steps beyond the others' included: `norm_owners`, so an odd
        norm alternates between ranks), under FSDP2 on its parameters gathered to that rank only; one
        flat vector over ``due``, exactly zero where another rank computes the value (so that the
        sum over the ranks' rows is the value). ``None`` when nothing is due."""
        self.norms_computed = []
        size = sum(len(indices) for _, indices in due)
        if not size:
            return None
        flat = [i for _, indices in due for i in indices]
        if not self._norm_work:
            self._norm_work = [0] * self.world
        scoring = [sum(c for c, o in zip(self.costs, self.owners, strict=True) if o == r) for r in range(self.world)]
        loads = [a + b for a, b in zip(scoring, self._norm_work, strict=True)]
        assigned = norm_owners([self.costs[i] for i in flat], loads)
        for i, rank in zip(flat, assigned, strict=True):
            self._norm_work[rank] += self.costs[i]
        self._norm_work = [w - min(self._norm_work) for w in self._norm_work]
        reads = [bounds.reads(i) for bounds, indices in due for i in indices]  # type: ignore[misc]
        owned_by = [bounds for bounds, indices in due for _ in indices]
        dtype = _promoted(reduction_dtype(t.dtype) for tensors in reads for t in tensors)
        out = [torch.zeros((), dtype=dtype, device=self.device)] * size
        for batch in rounds(assigned, self.world):  # each rank's k-th norm side by side, as in each_gradient
            mine = None
            for k in batch:
                whole = self._held(assigned[k], reads[k])
                if whole is not None:  # only its full weight and the workspace of its norm are alive
                    mine = k, whole
                del whole
            if mine is not None:
                k, whole = mine
                bounds = owned_by[k]
                assert bounds.exact is not None
                out[k] = bounds.exact([flat[k]], [whole])[0].to(dtype)
                self.norms_computed.append(flat[k])
                del whole
            del mine
        return torch.stack(out)

    def _held(self, rank: int, tensors: list[Tensor]) -> list[Tensor] | None:
        """Full ``tensors`` on ``rank`` (``None`` elsewhere): sharded ones gathered to it."""
        if any(is_sharded(t) for t in tensors):
            gathered = [self._gather(t, rank) if is_sharded(t) else t for t in tensors]
            return None if rank != self.rank else gathered  # type: ignore[return-value]
        return tensors if rank == self.rank else None

    # ------------------------------------------------------------------ agreement
    def share_scores(
        self,
        gather: Gatherer,
        layers: Sequence[Layer],
        dual_norms: Tensor,
        curvatures: dict[int, Tensor],
        pending: Sequence[int],
        planned: Tensor,
        norms: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor], Tensor, Tensor, Tensor | None]:
        """The step's one collective: this rank's dual norms and adaptive curvatures (of its own
        layers), its exact weight ``norms`` (of `exact_norms`), a checksum of every layer's gradient
        (DDP: every rank must hold the same, read in the step's host synchronisation) and its
        planned random/cyclic choice are all-gathered.
        Returns each layer's dual norm, and the curvature of each ``pending`` layer that has a
        gradient now (every rank knows which) from its owner's row, every rank's checksums ``(world,
        n)``, rank 0's planned choice and each exact norm from its owner's row."""
        n = len(layers)
        # A row wide enough for the exact norms too (float64 norms beside float32 scores).
        dtype = dual_norms.dtype if norms is None else torch.promote_types(dual_norms.dtype, norms.dtype)
        owned = torch.zeros((2, n), dtype=dtype, device=dual_norms.device)
        owned[0] = dual_norms
        for i, value in curvatures.items():
            owned[1, i] = value.to(owned.dtype)
        checks = torch.zeros_like(dual_norms)
        if not any(is_sharded(p) for layer in layers for p in layer.params):  # DDP: every rank holds them
            for i, layer in enumerate(layers):
                grads = [p.grad for p in layer.params if p.grad is not None]
                if grads:
                    checks[i] = sum(g.to(checks.dtype).square().sum() for g in grads)
        extra = [] if norms is None else [norms.to(dtype)]
        rows = gather(torch.cat([owned.reshape(-1), checks.to(dtype), *extra, planned.to(dtype).reshape(1)]))
        received = None
        if norms is not None:  # every rank but the owner sent 0 (exactly): the sum is the owner's value
            received = rows[:, 3 * n : 3 * n + len(norms)].sum(dim=0).to(norms.dtype)
        values = rows[:, : 2 * n].reshape(self.world, 2, n).to(dual_norms.dtype)
        if self._owner_index is None or self._owner_index.device != rows.device:  # uploaded once
            self._owner_index = torch.tensor(self.owners, device=rows.device)
        values = values[self._owner_index, :, torch.arange(n, device=rows.device)].T
        measured = {i: values[1, i] for i in pending if layers[i].weight.grad is not None}
        planned, checks = rows[0, -1].to(dual_norms.dtype), rows[:, 2 * n : 3 * n].to(dual_norms.dtype)
        return values[0], measured, planned, checks, received

    # ------------------------------------------------------------------ steps
    def share_step(
        self, index: int, step: Tensor | None, extra: Tensor | None, shape: Sequence[int], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Layer ``index``'s block step (and one scalar ``extra``) broadcast from its owner; ``shape``
        and ``dtype`` are the block step's, known to every rank."""
        owner = self.owners[index]
        if self.rank == owner:
            assert step is not None
            extra = step.new_zeros(()) if extra is None else extra
            buffer = torch.cat([step.to(dtype).reshape(-1), extra.to(dtype).reshape(1)])
        else:
            buffer = torch.empty(math.prod(shape) + 1, dtype=dtype, device=self.device)
        dist.broadcast(buffer, src=owner)
        return buffer[:-1].reshape(tuple(shape)), buffer[-1]

    def scatter_step(self, index: int, layer: Layer, step: Tensor | None, dtype: torch.dtype) -> None:
        """FSDP2, when no rank needs the whole step afterwards: layer ``index``'s step from its owner,
        each rank receiving and adding only its own dim-0 shard of the weight (and bias)."""
        owner = self.owners[index]
        step = None if step is None else step.to(dtype)
        if layer.rows is None and layer.bias_rows is None:  # the block's rows are the parameters' rows
            shard = self._scatter_rows(
                step, (layer.weight.shape[0], layer.in_features + (layer.bias is not None)), owner, dtype
            )
            weight, bias = shard[:, : layer.in_features], shard[:, layer.in_features :]
            _add_shard(layer.weight, weight.reshape(-1, *layer.weight.shape[1:]))
            if layer.bias is not None:
                _add_shard(layer.bias, bias.reshape(-1))
            return
        parts = layer.split(step) if step is not None else (None, None)
        for param, part in ((layer.weight, parts[0]), (layer.bias, parts[1])):
            if param is not None:
                _add_shard(param, self._scatter_rows(part, param.shape, owner, dtype))

    def _scatter_rows(self, whole: Tensor | None, shape: Sequence[int], owner: int, dtype: torch.dtype) -> Tensor:
        """This rank's dim-0 shard of ``whole`` (held by ``owner`` only): the owner scatters its row
        chunks, copied only where they are not contiguous or the rows do not split evenly."""
        rows = shape[0]
        chunk = math.ceil(rows / self.world)
        mine = torch.empty((chunk, *shape[1:]), dtype=dtype, device=self.device)
        pieces = None
        if whole is not None:
            if rows % self.world or not whole.is_contiguous():
                padded = whole.new_zeros((chunk * self.world, *shape[1:]))
                padded[:rows] = whole
                whole = padded
            pieces = list(whole.split(chunk))
        dist.scatter(mine, pieces, src=owner)
        return mine[: _shard_rows(rows, self.world, self.rank)]

    def read(self, summary: Tensor, checks: Tensor | None, gather: Gatherer | None, step: int) -> list[float]:
        """The step's one host synchronisation: the decision ``summary`` every rank computed alike
        (shared: with every rank's gradient checksums, which must agree), or, replicated, rank 0's
        summary, every rank's being all-gathered and checked against it."""
        if self.shared:
            assert checks is not None
            values = torch.cat([summary, checks.reshape(-1).to(summary.dtype)]).tolist()
            self.check_agreement(values[len(summary) :], step)
            return values[: len(summary)]
        if gather is not None:
            rows = gather(summary).tolist()
            check_rows_agree(rows, step)
            return rows[0]
        return summary.tolist()

    def complete_pending(self, pending: dict, indices: Sequence[int], shapes: Sequence[Sequence[int]]) -> None:
        """Before a checkpoint (a collective): the pending adaptive steps of ``indices``, kept by
        their owners only (a stand-in elsewhere), with their ``⟨g, Δ⟩``, broadcast to every rank,
        so that the state rank 0 saves is complete."""
        for i in sorted(indices):
            entry, shape = pending[i], tuple(shapes[i])
            if self.rank == self.owners[i]:
                buffer = torch.cat([entry.step.reshape(-1), entry.grad_dot_step.to(entry.step.dtype).reshape(1)])
            else:
                buffer = entry.step.new_empty(math.prod(shape) + 1)
            dist.broadcast(buffer, src=self.owners[i])
            entry.step, entry.grad_dot_step = buffer[:-1].reshape(shape), buffer[-1]

    def check_agreement(self, checks: list[float], step: int) -> None:
        """Every rank must hold the same gradients (DDP): ``checks`` are every rank's per-layer
        sums of squares, read in the step's one host synchronisation."""
        n = len(self.owners)
        rows = [checks[r * n : (r + 1) * n] for r in range(self.world)]
        for rank, row in enumerate(rows[1:], start=1):
            differ = [i for i, (a, b) in enumerate(zip(row, rows[0], strict=True)) if not _same(a, b)]
            if differ:
                raise RuntimeError(
                    f"DSGD ranks disagree at step {step}: the gradients of layer(s) {differ} on rank {rank} differ "
                    "from rank 0's. Their gradients were not averaged over the ranks. Train through a DSGD strategy "
                    "or DSGDMixin with Lightning's DDP/FSDP2, call self.manual_backward (not loss.backward()), and "
                    "keep every trainable layer in the forward."
                )


def check_rows_agree(rows: list[list[float]], step: int) -> None:
    """Replicated scoring: every rank scored the same gradients and constants, so its greedy
    choice and finiteness equal rank 0's; a rank that differs means they were not synchronised."""
    for rank, row in enumerate(rows[1:], start=1):
        if row[:2] != rows[0][:2]:
            raise RuntimeError(
                f"DSGD ranks disagree at step {step}: rank {rank} scores layer {int(row[0])} best "
                f"(all finite: {bool(row[1])}) but rank 0 scores layer {int(rows[0][0])} (all finite: "
                f"{bool(rows[0][1])}). Their gradients or input norms differ: the gradients were not averaged "
                "over the ranks. Train through a DSGD strategy or DSGDMixin with Lightning's DDP/FSDP2, call "
                "self.manual_backward (not loss.backward()), and keep every trainable layer in the forward."
            )


def _promoted(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype that holds every one of ``dtypes`` exactly."""
    return functools.reduce(torch.promote_types, dtypes)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _add_shard(param: Tensor, shard: Tensor) -> None:
    """Add this rank's dim-0 ``shard`` of a step to the sharded ``param`` (a ``DTensor``)."""
    from torch.distributed.tensor import DTensor

    spec = {"run_check": False, "shape": param.shape, "stride": param.stride()}
    local = shard.to(param.dtype)
    param.add_(DTensor.from_local(local, param.device_mesh, param.placements, **spec))  # type: ignore[attr-defined]


def _shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard on ``rank`` (``torch.chunk`` sizes, as ``Shard(0)`` places them)."""
    chunk = math.ceil(rows / world)
    return max(0, min(chunk, rows - rank * chunk))


def _check_shardable(layer: Layer, world: int) -> None:
    """Shared work gathers dim-0 shards over every rank in rank order (FSDP2's data-parallel mesh)."""
    for p in layer.params:
        if not is_sharded(p):
            continue
        from torch.distributed.tensor import Shard

        mesh_ranks = p.device_mesh.mesh.flatten().tolist()  # type: ignore[attr-defined]
        if tuple(p.placements) != (Shard(0),) or mesh_ranks != list(range(world)):  # type: ignore[attr-defined]
            raise ValueError(
                f"share_work splits DSGD's layers among ranks, and it supports parameters sharded on dim 0 over "
                f"every rank in order (FSDP2 data parallelism); {layer.name} is placed {p.placements} on ranks "  # type: ignore[attr-defined]
                f"{mesh_ranks}. Pass share_work=False (DSGDSettings(share_work=False)) to score on full tensors."
            )
