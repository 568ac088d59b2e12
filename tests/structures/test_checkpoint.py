"""safe_load with placeholders: numpy metadata (MMPose's dataset_meta) must load in every process."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bmp_lightning.structures.checkpoint import (
    UnknownObject,
    _numpy_globals,
    _placeholder_globals,
    extract_state_dict,
    safe_load,
)


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


def test_extract_state_dict_reads_every_layout():
    """The one state-dict reader: Lightning (``state_dict`` + ``net.``), MMEngine (``state_dict``), Meta
    (``model``), DDP-wrapped (``module.`` on every key), bare; non-tensors dropped."""
    w = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    lightning = {"state_dict": {**{f"net.{k}": v for k, v in w.items()}, "ema.x": torch.ones(1)}, "epoch": 3}
    assert extract_state_dict(lightning, keys=("state_dict",), prefix="net.").keys() == w.keys()
    assert extract_state_dict({"state_dict": w, "meta": {"epoch": 1}}).keys() == w.keys()
    assert extract_state_dict({"model": w}).keys() == w.keys()
    assert extract_state_dict({f"module.{k}": v for k, v in w.items()}).keys() == w.keys()
    assert extract_state_dict({**w, "step": 5}).keys() == w.keys()
    with pytest.raises(ValueError, match="under 'net.'"):
        extract_state_dict({"state_dict": w}, prefix="net.")
    with pytest.raises(ValueError, match="expected a dict of tensors"):
        extract_state_dict([1, 2])
