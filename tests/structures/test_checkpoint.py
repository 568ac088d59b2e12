"""safe_load with placeholders: numpy metadata (MMPose's dataset_meta) must load in every process."""

import os
import subprocess
import sys

import numpy as np
import torch

from bmp_lightning.structures.checkpoint import UnknownObject, _numpy_globals, _placeholder_globals, safe_load


class HubHistory:  # stands in for MMEngine's message_hub objects
    pass


def _file(tmp_path):
    path = tmp_path / "mm.pth"
    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "meta": {"flip": np.arange(3), "s": np.float32(2)}, "hub": HubHistory()},
        path,
    )
    return path


def test_allowlisted_numpy_names_get_no_placeholder(tmp_path):
    path = _file(tmp_path)
    names = [name for _, name in _placeholder_globals(path, _numpy_globals())]
    assert len(names) == 1 and names[0].endswith(".HubHistory")


def test_loads_identically_under_different_hash_seeds(tmp_path):
    path = _file(tmp_path)
    obj = safe_load(path, placeholders=True)
    assert isinstance(obj["meta"]["flip"], np.ndarray) and isinstance(obj["hub"], UnknownObject)
    code = (
        "import sys, numpy as np; from bmp_lightning.structures.checkpoint import safe_load;"
        "o = safe_load(sys.argv[1], placeholders=True); assert isinstance(o['meta']['flip'], np.ndarray)"
    )
    for seed in ("0", "1", "2", "3", "4", "5"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env, capture_output=True)
