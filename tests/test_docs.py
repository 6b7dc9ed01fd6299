"""The documentation keeps up with the code: every error message the package raises is listed on the
troubleshooting page; the README's example runs; its picture and links exist; every page of the
site is in the navigation; docstrings cross-reference in Markdown (no Sphinx roles) and cite theory sections that exist;
and the site builds with ``mkdocs build --strict`` with every reference rendered (also run by CI: ``make docs``)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "lightning_dsgd"
TROUBLESHOOTING = DOCS / "troubleshooting.md"


# ---------------------------------------------------------------------- error messages
def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "string"`` (implicit concatenation included)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _fixed_parts(node: ast.expr, constants: dict[str, str]) -> list[str]:
    """The literal pieces of a message expression, in order (placeholders split them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name) and node.id in constants:
        return [constants[node.id]]
    if isinstance(node, ast.JoinedStr):
        parts, current = [], ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                current += str(value.value)
            else:
                parts.append(current)
                current = ""
        return [*parts, current]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _fixed_parts(node.left, constants) + _fixed_parts(node.right, constants)
    return []


def error_messages() -> list[tuple[str, str]]:
    """``(where, fixed text)`` of every ``raise SomeError(message)`` in the package: the longest
    literal piece of the message, whitespace-normalised, cut to 60 characters."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        constants = _constants(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            parts = [" ".join(p.split()) for p in _fixed_parts(node.exc.args[0], constants)]
            parts = [p.strip(" .:;,") for p in parts]
            text = max(parts, key=len, default="")
            if len(text) >= 12:
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", text[:60]))
    return found


def test_the_scan_finds_the_package_errors():
    texts = [text for _, text in error_messages()]
    assert len(texts) >= 20
    assert any("DSGD(model.parameters())" in text for text in texts)


def test_every_error_message_is_on_the_troubleshooting_page():
    page = " ".join(TROUBLESHOOTING.read_text().split())
    missing = [f"{where}: {text!r}" for where, text in error_messages() if text not in page]
    assert not missing, (
        "Add these error messages (verbatim, e.g. in a code span) with their fix to docs/troubleshooting.md:\n"
        + "\n".join(missing)
    )


# ---------------------------------------------------------------------- README
def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_setup_commands():
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme(), flags=re.S)
    assert blocks and blocks[0].split() == ["make", "demo", "make", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile and "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_picture_and_links_exist():
    text = readme()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images, "the README shows the layer-choice chart"
    for image in images:
        assert (ROOT / image).is_file() and (ROOT / image).stat().st_size < 200_000, image
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not link.startswith(("http://", "https://")):
            assert (ROOT / link).exists(), link


def readme_snippet() -> str:
    """The README's Python example, on a two-step budget."""
    code = re.findall(r"```python\n(.*?)```", readme(), flags=re.S)[0]
    assert len(code.strip().splitlines()) <= 40
    assert "max_epochs=30" in code
    return code.replace("max_epochs=30", "max_epochs=1, max_steps=2, enable_progress_bar=False")


def outside_the_repository(tmp_path: Path) -> dict[str, str]:
    """An environment in which only the package of this checkout is importable from the
    repository (a folder holding a link to it), not the repository itself: no ``examples``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "lightning_dsgd").symlink_to(PACKAGE, target_is_directory=True)
    # WANDB_SERVICE: a W&B service started by an earlier test of this process; a fresh user has none
    env = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    return {**env, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_readme_usage_example_runs_outside_the_repository(tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "snippet.py").write_text(readme_snippet() + "\nprint('steps', trainer.global_step)\n")
    env = outside_the_repository(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import examples"], cwd=work, env=env, capture_output=True)
    assert probe.returncode != 0  # the repository's folders are out of reach
    result = subprocess.run(
        [sys.executable, "snippet.py"], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "steps 2" in result.stdout
    (log_dir,) = work.glob("lightning_logs/digits/version_0")
    assert (log_dir / "dsgd_layers.png").is_file() and "dsgd_layers/chosen/" in (log_dir / "metrics.csv").read_text()
    # the offline W&B run (its .wandb file is written by W&B's service process, which may finish after ours)
    assert list(work.glob("lightning_logs/wandb/offline-run-*")), "the README's offline W&B run"
    for _ in range(60):
        if list(work.glob("lightning_logs/wandb/offline-run-*/*.wandb")):
            break
        time.sleep(0.5)
    assert list(work.glob("lightning_logs/wandb/offline-run-*/*.wandb")), "the README's W&B run file"


# ---------------------------------------------------------------------- the site
def test_every_page_is_in_the_navigation_and_every_nav_entry_exists():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"([\w/.-]+\.md)", config.split("nav:", 1)[1]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert nav == pages


SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc|ref|py:\w+):`")
RENDERED_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc|ref|py:\w+):(?:`|<code>)")


def test_docstrings_use_markdown_cross_references_not_sphinx_roles():
    """mkdocstrings renders Markdown: a Sphinx role (``:class:`X```) would show as literal text.
    Cross-reference with autorefs instead: ``[DSGDSettings][lightning_dsgd.DSGDSettings]``."""
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if SPHINX_ROLE.search(line)
    ]
    assert not found, "\n".join(found)


THEORY_CITATION = re.compile(r'docs/theory\.md, "([^"\n]+)"')


def test_docstrings_cite_theory_sections_that_exist():
    """Docstrings cite the maths as ``docs/theory.md, "`` followed by a heading in quotes;
    every cited heading is on that page (and no docstring cites a spec file that is not in the repository)."""
    headings = {
        line.lstrip("#").strip() for line in (DOCS / "theory.md").read_text().splitlines() if line.startswith("#")
    }
    sources = [*sorted(PACKAGE.rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]
    cited = {(path.relative_to(ROOT), title) for path in sources for title in THEORY_CITATION.findall(path.read_text())}
    assert len(cited) >= 6
    missing = [f"{path}: {title!r}" for path, title in sorted(cited) if title not in headings]
    assert not missing, "\n".join(missing)
    stale = [str(path.relative_to(ROOT)) for path in sources if "ALGORITHM" + ".md" in path.read_text()]
    assert not stale, stale


def _mkdocs() -> str | None:
    local = Path(sys.executable).parent / "mkdocs"
    return str(local) if local.exists() else shutil.which("mkdocs")


@pytest.mark.skipif(_mkdocs() is None, reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_strictly_with_every_reference_rendered(tmp_path):
    """``mkdocs build --strict`` fails on a broken cross-reference (autorefs warns); the built pages
    must hold no unrendered Sphinx role and no unresolved ``[title][identifier]`` reference."""
    site = tmp_path / "site"
    command = [_mkdocs(), "build", "--strict", "--site-dir", str(site)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Could not find cross-reference target" not in output, output[-4000:]
    assert (site / "theory" / "index.html").is_file()
    problems = []
    for page in sorted(site.rglob("*.html")):
        text = page.read_text()
        for match in RENDERED_ROLE.finditer(text):
            problems.append(f"{page.relative_to(site)}: unrendered role {text[match.start() : match.start() + 60]!r}")
        for match in re.finditer(r"\[[^\]<>]{1,80}\]\[[\w.]*\]", text):
            problems.append(f"{page.relative_to(site)}: unresolved reference {match.group()!r}")
    assert not problems, "\n".join(problems[:40])
    # The monitor's module docstring (every key it logs) is on the API page.
    api = (site / "api" / "lightning" / "index.html").read_text()
    assert "dsgd_layers/score/" in api and "observe-only" in api.lower()
