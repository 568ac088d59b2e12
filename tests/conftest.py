from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
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


# ----------------------------------------------------------------------------------------------- composed configs
def compose_job(config_name: str | None, *overrides: str, base_dir: Path, out_dir: Path | None = None) -> Any:
    """A Hydra config of ``conf/`` composed as the entry points see it, with its paths under ``base_dir``.

    ``config_name`` (``train.yaml``, ``eval.yaml``, ``bmp.yaml``) is composed like ``@hydra.main`` does it: the
    ``hydra`` node is resolved into :class:`HydraConfig` and then removed, ``paths.output_dir`` is ``out_dir``
    (default ``base_dir / "run"``) and ``paths.work_dir`` the repository. ``paths.data_dir`` and ``paths.log_dir``
    default to ``base_dir / "data"`` and ``base_dir / "logs"``; an override of either wins. With ``config_name=None``
    only the groups named in ``overrides`` are composed (``+data=<name>``; ``paths`` is added), no ``hydra`` node.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = [
        f"{key}={base_dir / sub}"
        for key, sub in (("paths.data_dir", "data"), ("paths.log_dir", "logs"))
        if key not in given
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        if config_name is None:
            return compose(config_name=None, overrides=["+paths=default", *defaults, *overrides])
        cfg = compose(config_name, overrides=[*defaults, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir if out_dir is not None else base_dir / "run")
        cfg.paths.work_dir = str(ROOT)
        del cfg["hydra"]
    return cfg


def compose_run(config_name: str, overrides: list[str], out_dir: Path) -> Any:
    """``compose_job`` for one run whose folder is ``out_dir`` (data and logs beside it, in ``out_dir.parent``)."""
    return compose_job(config_name, *overrides, base_dir=out_dir.parent, out_dir=out_dir)


@pytest.fixture(scope="session")
def compose_cfg() -> Callable[..., Any]:
    """:func:`compose_job` itself, for fixtures wider than a test (they pass their own ``base_dir``)."""
    return compose_job


@pytest.fixture
def cfg_train(tmp_path: Path) -> Callable[..., Any]:
    """``cfg_train(*overrides, out_dir=None)``: ``conf/train.yaml`` composed with its paths in ``tmp_path``."""
    return functools.partial(compose_job, "train.yaml", base_dir=tmp_path)


@pytest.fixture
def cfg_eval(tmp_path: Path) -> Callable[..., Any]:
    """``cfg_eval(*overrides, out_dir=None)``: ``conf/eval.yaml`` composed with its paths in ``tmp_path``."""
    return functools.partial(compose_job, "eval.yaml", base_dir=tmp_path)


@pytest.fixture
def cfg_bmp(tmp_path: Path) -> Callable[..., Any]:
    """``cfg_bmp(*overrides, out_dir=None)``: ``conf/bmp.yaml`` (the BMP evaluation job) with its paths in
    ``tmp_path``; its evaluation split is the ``split`` group (``split=<name>``, ``conf/split/``)."""
    import bmp_lightning.loop.config  # noqa: F401  (registers loop/base, which conf/loop/*.yaml derive from)

    return functools.partial(compose_job, "bmp.yaml", base_dir=tmp_path)


@pytest.fixture
def cfg_data(tmp_path: Path) -> Callable[..., Any]:
    """``cfg_data(name, *overrides)``: only the ``data=<name>`` group (and ``paths``), data under ``tmp_path/data``."""
    return lambda name, *overrides: compose_job(None, f"+data={name}", *overrides, base_dir=tmp_path)
