"""The habits are wired: pre-commit runs ruff (at the pinned version) and nbstripout, CI lints before it tests, and
the committed notebooks carry no outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pinned(name: str) -> str:
    text = (ROOT / "requirements" / "constraints.txt").read_text()
    m = re.search(rf"^{re.escape(name)}==(\S+)", text, flags=re.M)
    assert m, f"{name} is not pinned in requirements/constraints.txt"
    return m.group(1)


def test_pre_commit_hooks() -> None:
    cfg = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    repos = {r["repo"].rsplit("/", 1)[-1]: r for r in cfg["repos"]}
    ruff = repos["ruff-pre-commit"]
    # the hook's ruff is the one `make lint` and CI run, so a commit that passes the hook passes CI
    assert ruff["rev"] == f"v{_pinned('ruff')}"
    assert [h["id"] for h in ruff["hooks"]] == ["ruff-check", "ruff-format"]
    assert [h["id"] for h in repos["nbstripout"]["hooks"]] == ["nbstripout"]


def test_ci_lints_before_testing() -> None:
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert steps == ["make lint", "make test"]
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), flags=re.M)
    assert lint and "ruff check ." in lint.group(1) and "ruff format --check ." in lint.group(1)


def test_notebooks_are_stripped() -> None:
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in cells), f"{path.name} has outputs"
