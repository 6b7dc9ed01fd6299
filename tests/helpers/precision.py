"""Precision helpers shared by the CPU emulations of a GPU's mixed-precision paths."""

from __future__ import annotations

import pytest
import torch

from lightning_dsgd import DSGD
from lightning_dsgd.geometry import rounding_margin

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def cuda_like_linalg(monkeypatch):
    """CUDA's linear algebra refuses half precision (``"geqrf_cuda" not implemented for 'BFloat16'``)
    and autocast does not upcast it: make the CPU's refuse too."""
    for name in ("qr", "svd", "svdvals", "matrix_norm", "eigvalsh"):
        real = getattr(torch.linalg, name)

        def refusing(a, *args, _real=real, _name=name, **kwargs):
            if a.dtype in HALF:
                raise RuntimeError(f'"linalg_{_name}_cuda" not implemented for {a.dtype} (emulated CUDA)')
            return _real(a, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, refusing)


def applied_over_certified(opt: DSGD, before: list[torch.Tensor]) -> tuple[float, float]:
    """``‖applied step‖₂ / (η‖g‖_*/L)`` of the layer moved last, and the allowance: the float32
    rounding margin of the direction plus the rounding of storing ``W + Δ`` (``u‖W'‖_F``)."""
    record = opt.last_step
    i = record.layer
    layer = opt.layers[i]
    params = layer.params
    after = [p.detach().double() for p in params]
    order = [id(p) for each in opt.layers for p in each.params]
    old = [before[order.index(id(p))].double() for p in params]
    step = after[0] - old[0]
    if layer.bias is not None:
        step = torch.cat([step, (after[1] - old[1]).unsqueeze(1)], dim=1)
    applied = torch.linalg.matrix_norm(step, ord=2).item()
    certified = (record.eta * record.dual_norms[i] / record.constants[i]).item()
    weights = torch.cat([after[0], after[1].unsqueeze(1)], dim=1) if layer.bias is not None else after[0]
    unit = torch.finfo(params[0].dtype).eps / 2
    margin = rounding_margin(torch.float32, max(step.shape))
    allowance = margin - 1.0 + unit * torch.linalg.matrix_norm(weights).item() / certified
    return applied / certified - 1.0, allowance
