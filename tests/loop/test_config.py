"""Loop presets and their Hydra configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bmp_lightning.loop.config import V1_EXACT_QUIRKS, LoopConfig, bmp_d3, bmp_v1_exact, resolve_loop_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "loop"


def test_d3_values():
    c = bmp_d3()
    assert (c.num_iters, c.det_score_thr, c.det_nms_iou, c.max_dets, c.person_label) == (2, 0.3, 0.3, 40, 0)
    assert (c.oks_nms_thr, c.confidence_thr, c.num_pos_keypoints, c.visibility_thr) == (0.8, 0.3, 6, 0.3)
    assert (c.use_bbox, c.num_neg_keypoints, c.exclusive_masks, c.segmenter) == (False, 0, True, "sam2")
    assert not c.sam_input_bgr and not c.oks_area_from_xyxy_as_xywh and c.remove_suppressed_old
    assert not c.prompt_index_slip and c.maskout == "contours" and c.nms_plus_one


def test_v1_exact_differs_only_in_quirks():
    d3, v1 = dataclasses.asdict(bmp_d3()), dataclasses.asdict(bmp_v1_exact())
    diff = {k for k in d3 if d3[k] != v1[k]}
    assert diff == {
        "sam_input_bgr",
        "oks_area_from_xyxy_as_xywh",
        "remove_suppressed_old",
        "prompt_index_slip",
        "empty_prompt_fallback",
        "sam_max_hole_area",
        "sam_max_sprinkle_area",
    }
    assert v1["sam_input_bgr"] and v1["oks_area_from_xyxy_as_xywh"] and not v1["remove_suppressed_old"]


@pytest.mark.parametrize("name, preset", [("bmp_d3", bmp_d3), ("bmp_v1_exact", bmp_v1_exact)])
def test_yaml_instantiates_the_preset(name, preset, cfg_bmp):
    cfg = cfg_bmp(f"loop={name}").loop
    assert instantiate(cfg) == preset()
    assert resolve_loop_config(name) == preset()
    assert resolve_loop_config(cfg) == preset()
    # every field is in the composed config, so command-line overrides need no '+'
    assert set(cfg.keys()) - {"_target_"} == {f.name for f in dataclasses.fields(LoopConfig)}
    assert instantiate(cfg_bmp(f"loop={name}", "loop.num_iters=3").loop) == preset(num_iters=3)


def test_presets_are_deltas():
    """bmp_d3.yaml states no field itself (LoopConfig's defaults are the one source); bmp_v1_exact.yaml derives from
    bmp_d3 and states exactly the quirk switches."""
    d3 = OmegaConf.load(CONF / "bmp_d3.yaml")
    v1 = OmegaConf.load(CONF / "bmp_v1_exact.yaml")
    assert set(d3.keys()) == {"defaults"}
    assert list(v1.defaults)[0] == "bmp_d3"
    assert set(v1.keys()) - {"defaults"} == set(V1_EXACT_QUIRKS)


def test_resolve_and_validation():
    assert resolve_loop_config({"preset": "bmp_v1_exact", "num_iters": 1}).num_iters == 1
    assert resolve_loop_config({"num_iters": 4}) == bmp_d3(num_iters=4)
    with pytest.raises(ValueError, match="unknown loop preset"):
        resolve_loop_config("bmp_x")
    with pytest.raises(ValueError, match="segmenter"):
        LoopConfig(segmenter="sam1")
    with pytest.raises(ValueError, match="maskout"):
        bmp_d3(maskout="blur")
