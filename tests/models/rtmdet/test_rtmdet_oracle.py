"""RTMDet-Ins-L against the MMDetection 3.3.0 reference outputs in ``shared/oracle`` (and its parameter count)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bmp_lightning.interop.mmdet import convert_mmdet_rtmdet
from bmp_lightning.models.components.rtmdet.rtmdet_ins import rtmdet_ins_l

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


NUM_PARAMS_L = 57_365_663  # unique parameters (MMDetection's README: 57.37 M)


def _mm_init(oracle_dir: Path):
    spec = importlib.util.spec_from_file_location("mm_init", oracle_dir / "mm_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_param_count_l():
    with torch.device("meta"):  # no memory, no init cost
        model = rtmdet_ins_l(80)
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS_L
    # 942 MMDetection keys minus the 36 reg_convs aliases (3 levels x 2 convs x 6 entries).
    assert len(model.state_dict()) == 942 - 36


def test_oracle_rtmdet_ins_l(oracle_dir: Path):
    """Converted reference weights load strictly and reproduce backbone, neck and every head output."""
    ref_sd = _mm_init(oracle_dir).reference_state_dict(oracle_dir / "rtmdet_ins_l_keys.txt")
    # Extra top-level entries as in a released file: only state_dict must be read.
    ckpt = {"state_dict": ref_sd, "meta": {"epoch": 300}, "ema_state_dict": {"steps": torch.tensor(1)}}
    model = rtmdet_ins_l(80).eval()
    model.load_state_dict(convert_mmdet_rtmdet(ckpt), strict=True)
    ref = torch.load(oracle_dir / "rtmdet_ins_l_rand.pt", weights_only=True)
    with torch.no_grad():
        c = model.backbone(ref["input"])
        p = model.neck(c)
        out = model.head(p)
    worst = 0.0
    for name, ours in [("backbone", c), ("neck", p)] + [(k, out[k]) for k in out]:
        theirs = ref[name]
        ours_l = list(ours) if isinstance(ours, (list, tuple)) else [ours]
        theirs_l = list(theirs) if isinstance(theirs, (list, tuple)) else [theirs]
        assert len(ours_l) == len(theirs_l), name
        for a, b in zip(ours_l, theirs_l):
            assert a.shape == b.shape, name
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
            worst = max(worst, float((a - b).abs().max()))
    print(f"oracle max abs diff: {worst:.3g}")
    assert set(out) == {"cls_scores", "bbox_preds", "kernel_preds", "mask_feat"}


def test_convert_rejects_nothing_silently(oracle_dir: Path):
    """The reference key list (942 keys) converts to exactly our state-dict keys."""
    keys = [line.split("\t")[0] for line in (oracle_dir / "rtmdet_ins_l_keys.txt").read_text().splitlines()]
    fake = {k: torch.zeros(1) for k in keys}
    with torch.device("meta"):
        model = rtmdet_ins_l(80)
    assert set(convert_mmdet_rtmdet(fake)) == set(model.state_dict())
