"""Every notebook in notebooks/ runs top to bottom on a fresh kernel of this environment (and is committed with its
outputs stripped)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch, tmp_path: Path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[dev]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient missing: pip install -e '.[dev]'")
    nb = nbformat.read(path, as_version=4)
    stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stale, f"{path.name}: commit notebooks with outputs stripped (cells {stale} have outputs)"

    # the kernel inherits this environment: offline hub, one intra-op thread on the shared CI cores
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # bmp_demo: on a fresh clone (no `make demo` models) tiny random networks, labelled as such in its output; its
    # figures go to a temporary folder, never over the committed ones
    monkeypatch.setenv("BMP_NOTEBOOK_ALLOW_TINY", "1")
    monkeypatch.setenv("BMP_NOTEBOOK_FIGURES", str(tmp_path / "figures"))
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.km = client.create_kernel_manager()
        client.start_new_kernel()
        client.start_new_kernel_client()
    except Exception as err:  # noqa: BLE001 - no jupyter kernel here: say why and skip
        pytest.skip(f"cannot start a Jupyter kernel ({type(err).__name__}: {err}); python is {sys.executable}")
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")
    finally:
        if client.km is not None and client.km.has_kernel:
            client.km.shutdown_kernel(now=True)
