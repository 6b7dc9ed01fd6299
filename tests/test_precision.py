"""``lightning_dsgd.precision``: DSGD's own arithmetic is IEEE float32 outside autocast whatever the
user set, the user's flags come back unchanged, and the settings that void a certificate are named."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_dsgd.precision import full_precision, low_precision_reason, reduced_precision_reason

# Each scenario sets the flags as a user would, in a fresh interpreter (torch's flag state, and its
# refusal to read legacy flags after the new API wrote them, are process-wide and sticky).
SCENARIOS = {
    "defaults": "",
    "legacy high": "torch.set_float32_matmul_precision('high')",
    "legacy medium": "torch.set_float32_matmul_precision('medium')",
    "legacy cuda tf32 only": "torch.backends.cuda.matmul.allow_tf32 = True",
    "new cuda tf32": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "new cpu bf16": "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'",
    "new generic tf32": "torch.backends.fp32_precision = 'tf32'",
}

_SCRIPT = """
import torch
from lightning_dsgd.precision import full_precision

def flags():
    out = []
    for read in (
        torch.get_float32_matmul_precision,
        lambda: torch.backends.cuda.matmul.allow_tf32,
        lambda: torch.backends.cudnn.allow_tf32,
        lambda: torch.backends.cuda.matmul.fp32_precision,
        lambda: torch.backends.mkldnn.matmul.fp32_precision,
    ):
        try:
            out.append(read())
        except RuntimeError:
            out.append("refuses")
    return out

def matmul_error():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(96, 96, generator=g), torch.randn(96, 96, generator=g)
    return ((a @ b).double() - a.double() @ b.double()).abs().max().item()

{setting}
before = flags()
with torch.autocast("cpu", dtype=torch.bfloat16):
    with full_precision(["cpu", "cuda"]):
        inside = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        autocast = torch.is_autocast_enabled("cpu")
        error = matmul_error()
    still_autocast = torch.is_autocast_enabled("cpu")
after = flags()
assert inside == ("ieee", "ieee") or set(inside) <= {{"ieee", "none"}}, inside
assert not autocast and still_autocast
assert error < 1e-4, error  # IEEE float32 on a 96-term dot product: ~1e-5; bfloat16 (AMX): ~1e-1
assert after == before, (before, after)
print("ok", before)
"""


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_full_precision_is_ieee_inside_and_restores_every_flag(scenario):
    script = _SCRIPT.format(setting=SCENARIOS[scenario])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_full_precision_changes_nothing_when_already_full():
    with full_precision(["cpu"]):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == "highest"


def test_reasons_name_the_setting():
    assert reduced_precision_reason("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in reduced_precision_reason("cpu")  # type: ignore[operator]
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert "reduced float32 matmul precision on cpu (bf16" in reduced_precision_reason("cpu")  # type: ignore[operator]
        assert "(tf32" in reduced_precision_reason("cuda")  # type: ignore[operator]
    finally:
        torch.set_float32_matmul_precision(previous)
    assert low_precision_reason([torch.float32, torch.float64]) is None
    assert "bfloat16, float16" in low_precision_reason([torch.float32, torch.float16, torch.bfloat16])  # type: ignore[operator]
