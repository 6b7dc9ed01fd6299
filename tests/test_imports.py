"""The core imports without Lightning; ``import lightning_dsgd`` still registers the strategy names once
Lightning is in use, whichever package is imported first (fresh interpreters: ``sys.modules`` is global)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["lightning_dsgd", "lightning_dsgd.optimizer", "lightning_dsgd.constants", "lightning_dsgd.layers"]


def python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_without_lightning(module):
    loaded = "sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))"
    code = f"import sys, {module}; print({loaded})"
    assert python(code) == "[]"


@pytest.mark.parametrize(
    "imports",
    [
        "import lightning_dsgd; import lightning",
        "import lightning; import lightning_dsgd",
        "import lightning_dsgd.optimizer; import lightning.pytorch",
    ],
)
def test_the_strategy_names_are_registered_when_lightning_is_used(imports):
    code = f"""{imports}
import lightning_dsgd
from lightning.pytorch.strategies import StrategyRegistry
print(all(name in StrategyRegistry for name in ("dsgd", "dsgd_ddp", "dsgd_ddp_spawn", "dsgd_model_parallel")))
print(lightning_dsgd.DSGDMixin.__module__)"""
    assert python(code).splitlines() == ["True", "lightning_dsgd.lightning.mixin"]


def test_an_unknown_name_is_an_attribute_error():
    import lightning_dsgd

    with pytest.raises(AttributeError, match="no_such_name"):
        lightning_dsgd.no_such_name  # noqa: B018
