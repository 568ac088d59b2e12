"""The virtuous circle, shown small (bmp_lightning.tools.virtuous_circle): matching logic by hand, and the whole
pipeline (detector + MaskPose training on synthetic crowds, BMP loop on held-out crowds) as a slow test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bmp_lightning.tools.virtuous_circle import (
    box_iou_xywh,
    compare_iterations,
    detector_overrides,
    greedy_match,
    pose_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


def test_box_iou_xywh_by_hand():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 10, 10], [20, 20, 5, 5], [0, 0, 10, 10]])
    # overlap 5x10 = 50, union 150
    np.testing.assert_allclose(box_iou_xywh(a, b), [[50 / 150, 0.0, 1.0]])


def test_greedy_match_one_to_one_by_score():
    gt = np.array([[0, 0, 10, 10], [100, 0, 10, 10]])
    # two predictions on the first person: the higher score takes it, the other matches nobody
    preds = np.array([[1, 0, 10, 10], [0, 0, 10, 10], [100, 0, 10, 10]])
    np.testing.assert_array_equal(greedy_match(preds, [0.9, 0.5, 0.4], gt), [0, 2])
    np.testing.assert_array_equal(greedy_match(preds[:2], [0.5, 0.9], gt), [1, -1])
    np.testing.assert_array_equal(greedy_match(np.zeros((0, 4)), [], gt), [-1, -1])


def test_compare_iterations_counts_people_found_in_iteration_2():
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"image_id": 1, "bbox": [0, 0, 10, 20]},
            {"image_id": 1, "bbox": [8, 0, 10, 20]},  # overlaps the first one: suppressed in iteration 1
            {"image_id": 2, "bbox": [50, 50, 10, 20]},
            {"image_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # ignored
        ],
    }
    iter1 = [
        {"image_id": 1, "bbox": [0, 0, 10, 20], "score": 0.9},
        {"image_id": 2, "bbox": [50, 50, 10, 20], "score": 0.8},
    ]
    iter2 = iter1 + [
        {"image_id": 1, "bbox": [8, 1, 10, 19], "score": 0.5},  # new, finds the second person
        {"image_id": 2, "bbox": [200, 0, 10, 20], "score": 0.4},  # new, a false positive
    ]
    out = compare_iterations(gt, iter1, iter2)
    assert out["num_gt"] == 3
    assert (out["matched_iter1"], out["matched_iter2"]) == (2, 3)
    assert out["recall50_iter1"] == pytest.approx(2 / 3) and out["recall50_iter2"] == pytest.approx(1.0)
    assert (out["new_predictions"], out["new_matched"], out["new_unmatched"], out["lost"]) == (2, 1, 1, 0)
    assert out["per_image"] == {1: 1}


def test_schedules_rescale():
    assert detector_overrides(30)[:3] == [
        "trainer.max_epochs=30",
        "callbacks.instseg_pipeline_switch.switch_epoch=25",
        "model.cosine_begin_epoch=15",
    ]
    assert "callbacks.instseg_pipeline_switch.switch_epoch=7" in detector_overrides(10)
    assert pose_overrides(8) == ["trainer.max_epochs=8", "model.milestones=[6]"]
    assert pose_overrides(2) == ["trainer.max_epochs=2", "model.milestones=[1]"]
    with pytest.raises(ValueError):
        detector_overrides(1)


@pytest.mark.slow
def test_virtuous_circle_iteration_2_beats_iteration_1(tmp_path):
    """Train both tiny models on CPU (detector 30 x 16 steps, MaskPose 16 x 35 steps: ~15 min on 2 busy cores; a
    10-epoch detector is too weak for the effect), run BMP on 24 held-out crowded scenes (5-9 people): iteration 2
    finds people iteration 1 missed, and pose AP, box AR100 and box recall are higher after 2 iterations than after 1.
    Training is deterministic, so the figures of experiments/bmp_synthetic/README.md repeat (pose AP 0.1021 -> 0.1043,
    recall@0.5 0.465 -> 0.516, 8 people found); the margins are small, so only the direction is asserted."""
    env = {**os.environ, "BMP_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "bmp_lightning.tools.virtuous_circle", f"out={tmp_path / 'out'}",
           "det_epochs=30", "pose_epochs=16"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    it1, it2 = s["iter1"], s["iter2"]
    assert it2["pose_AP"] > it1["pose_AP"]
    assert it2["pose_AR"] >= it1["pose_AR"]
    assert it2["bbox_AR100"] > it1["bbox_AR100"]
    assert it2["recall50"] > it1["recall50"]
    assert s["people"]["new_matched"] >= 1
