"""The install route besides the clone: the wheel builds offline, carries the license, ``py.typed``
and the ``lightning-dsgd`` command, and, installed into a fresh virtual environment, trains.

The fresh environment gets the dependencies (torch, lightning, …) of the environment running the
tests through a ``.pth`` line naming its site-packages, added *after* the wheel is installed with
``--no-deps``: nothing is downloaded, and the only ``lightning_dsgd`` the new interpreter can
import is the wheel's (a path line does not run that folder's own ``.pth`` files, so an editable
install there stays out of reach)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_docs import readme_snippet

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "lightning_dsgd"]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, " ".join(command) + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    return result


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of a copy of the sources (the build leaves ``build/`` and ``*.egg-info`` behind)."""
    import shutil

    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if name == "lightning_dsgd" else {}),
        )
    pytest.importorskip("setuptools", minversion="77", reason="building offline needs setuptools>=77 (the dev extra)")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    run([*command, "--wheel-dir", str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lightning_dsgd-*-py3-none-any.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_environment_and_trains(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_dsgd/py.typed" in names and "lightning_dsgd/lightning/callback.py" in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    assert not any(name.startswith(("examples/", "tests/")) for name in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    run(install, cwd=tmp_path)
    (new_site,) = (venv / "lib").glob("python*/site-packages")
    (new_site / "test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "WANDB_SERVICE")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    where = run([str(python), "-c", "import lightning_dsgd; print(lightning_dsgd.__file__)"], cwd=work, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv)  # the wheel's copy, not the repository's
    version = run([str(venv / "bin" / "lightning-dsgd"), "--version"], cwd=work, env=env)
    assert version.stdout.startswith("lightning-dsgd ")

    (work / "snippet.py").write_text(readme_snippet() + "\nprint('steps', trainer.global_step)\n")
    fit = run([str(python), "snippet.py"], cwd=work, env=env)
    assert "steps 2" in fit.stdout
    assert (work / "lightning_logs" / "digits" / "version_0" / "metrics.csv").is_file()
