from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `shared` folder beside the project (real sample data, oracle); tests skip when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data folder not found beside the project ({SHARED.name}/data): real-data test skipped")
    return SHARED


@pytest.fixture(scope="session")
def sample_data_dir(shared_dir: Path) -> Path:
    return shared_dir / "data"


@pytest.fixture(scope="session")
def oracle_dir(shared_dir: Path) -> Path:
    path = shared_dir / "oracle"
    if not path.is_dir():
        pytest.skip("shared/oracle not found beside the project: oracle test skipped")
    return path


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread (model-heavy test modules opt in with ``pytestmark``): on a shared 2-core machine OpenMP
    barriers under oversubscription cost 10-100x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_pose_data_dir(tmp_path_factory) -> Path:
    """A `paths.data_dir` holding the smoke experiment's synthetic dataset (16 images, generated once per session).

    `experiment=smoke` reads `${paths.data_dir}/synthetic_smoke`; the 4 val images hold 17 people (odd: a 2-process
    validation pads one duplicate).
    """
    from bmp_lightning.data.synthetic import generate

    data_dir = tmp_path_factory.mktemp("pose_data")
    generate(data_dir / "synthetic_smoke", n_images=16, seed=0, val_fraction=0.25)
    return data_dir
