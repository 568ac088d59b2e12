"""MMDetection RTMDet-Ins checkpoint conversion: extra top-level keys, aliasing, class counts, prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bmp_lightning.interop.mmdet import (
    convert_mmdet_rtmdet,
    is_mmdet_rtmdet_checkpoint,
    load_mmdet_rtmdet,
    mmdet_num_classes,
    to_mmdet,
)
from bmp_lightning.models.components.rtmdet.rtmdet_ins import rtmdet_ins_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if t.dim() == 1 else torch.randn(t.shape, generator=g))
    return model


def test_mmdet_layout_round_trip_with_extra_keys(tmp_path: Path):
    model = _randomised(rtmdet_ins_tiny(1))
    ours = model.state_dict()
    mm = to_mmdet(ours)
    # What an MMDetection file holds: reg_convs aliases, data-preprocessor buffers, EMA / optimizer / logs.
    assert "bbox_head.reg_convs.2.1.conv.weight" in mm and "bbox_head.rtm_cls.0.weight" in mm
    mm["data_preprocessor.mean"] = torch.zeros(3, 1, 1)
    ckpt = {
        "meta": {"epoch": 300, "dataset_meta": {"classes": ("person",)}},
        "state_dict": mm,
        "ema_state_dict": {"module." + k: torch.zeros_like(v) for k, v in mm.items()} | {"steps": torch.tensor(5)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.004}]},
        "message_hub": {"log_scalars": {}, "runtime_info": {"iter": 10}},
    }
    path = tmp_path / "rtmdet_ins_person.pth"
    torch.save(ckpt, path)
    assert is_mmdet_rtmdet_checkpoint(ckpt) and mmdet_num_classes(ckpt) == 1
    converted = convert_mmdet_rtmdet(path)  # from the file, through the safe loader
    assert set(converted) == set(ours)
    for k, v in ours.items():
        assert torch.equal(converted[k], v), k
    fresh = rtmdet_ins_tiny(1)
    assert load_mmdet_rtmdet(fresh, path) == ([], [])
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ours[k]), k


def test_alias_resolution_last_written_wins():
    """MMEngine loads cls_convs.0..2 then reg_convs.0..2; the shared conv keeps reg_convs.2, BNs their reg copy."""
    mm = to_mmdet(rtmdet_ins_tiny(1).state_dict())
    for n in range(3):
        mm[f"bbox_head.cls_convs.{n}.0.conv.weight"] = torch.full_like(mm[f"bbox_head.cls_convs.{n}.0.conv.weight"], n)
        mm[f"bbox_head.reg_convs.{n}.0.conv.weight"] = torch.full_like(
            mm[f"bbox_head.cls_convs.{n}.0.conv.weight"], 10 + n
        )
        mm[f"bbox_head.cls_convs.{n}.1.bn.weight"] = torch.full_like(mm[f"bbox_head.cls_convs.{n}.1.bn.weight"], n)
        mm[f"bbox_head.reg_convs.{n}.1.bn.weight"] = torch.full_like(mm[f"bbox_head.cls_convs.{n}.1.bn.weight"], 20 + n)
    out = convert_mmdet_rtmdet({"state_dict": mm})
    for n in range(3):
        assert (out[f"head.cls_convs.{n}.0.conv.weight"] == 12).all()
        assert (out[f"head.cls_convs.{n}.1.bn.weight"] == 20 + n).all()
    # Without reg_convs keys (a file written by us with to_mmdet minus the aliases) the cls copy is used.
    mm = {k: v for k, v in mm.items() if ".reg_convs." not in k}
    out = convert_mmdet_rtmdet(mm)
    assert (out["head.cls_convs.0.0.conv.weight"] == 2).all() and (out["head.cls_convs.1.1.bn.weight"] == 1).all()
    model = rtmdet_ins_tiny(1)
    model.load_state_dict(out, strict=True)
    assert (model.head.cls_convs[0][0].conv.weight == 2).all()


def test_class_counts_tood_prefix_and_skips():
    coco = _randomised(rtmdet_ins_tiny(80))
    mm = to_mmdet(coco.state_dict())
    # Very early RTMDet files named the predictors tood_*; data_preprocessor buffers are skipped.
    mm = {k.replace("bbox_head.rtm_", "bbox_head.tood_"): v for k, v in mm.items()}
    mm["data_preprocessor.std"] = torch.ones(3, 1, 1)
    assert is_mmdet_rtmdet_checkpoint(mm) and mmdet_num_classes(mm) == 80
    full = convert_mmdet_rtmdet({"state_dict": mm})
    assert full["head.rtm_cls.0.weight"].shape[0] == 80 and not any(k.startswith("data_") for k in full)
    rtmdet_ins_tiny(80).load_state_dict(full, strict=True)
    person = convert_mmdet_rtmdet({"state_dict": mm}, num_classes=1)  # COCO model -> person only (class 0)
    assert torch.equal(person["head.rtm_cls.2.weight"], coco.head.rtm_cls[2].weight[:1])
    assert torch.equal(person["head.rtm_cls.2.bias"], coco.head.rtm_cls[2].bias[:1])
    rtmdet_ins_tiny(1).load_state_dict(person, strict=True)
    more = convert_mmdet_rtmdet(mm, num_classes=81)
    assert not any(k.startswith("head.rtm_cls.") for k in more)
    # DDP-style "module." prefixes are stripped.
    assert set(convert_mmdet_rtmdet({"state_dict": {"module." + k: v for k, v in mm.items()}})) == set(full)
