"""CUDA checks (``make test-gpu``, marker ``gpu``; skipped without a GPU): a bf16 training step, Detector and
PoseEstimator on CUDA against the CPU, DDP over NCCL. The timed figures are ``make gpu-check``."""

from __future__ import annotations

import pytest
import torch

from bmp_lightning.tools import gpu_check as gc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_training_step_vitpose_b() -> None:
    res = gc.check_pose_train("cuda", tiny=False, steps=3, batch=16)
    assert res["finite"] and res["loss_last"] < res["loss_first"] * 10
    # ViT-B at 256x192: ~17 GMACs forward, so ~100 GFLOP forward + backward
    assert res["peak_memory_gib"] > 0 and 30 < res["gflops_per_sample"] < 200


def test_pose_estimator_cuda_matches_cpu() -> None:
    res = gc.check_pose_estimator("cuda", tiny=False, n_boxes=8)
    # fp32 on both; cuDNN may use TF32 for the convolutions
    assert res["heatmap_max_rel_diff_vs_cpu"] < 1e-2, res


def test_detector_cuda_matches_cpu() -> None:
    res = gc.check_detector("cuda", tiny=False)
    assert res["head_max_rel_diff_vs_cpu"] < 1e-2, res


def test_ddp_nccl_step() -> None:
    res = gc.check_ddp("cuda", tiny=True, batch=4)
    assert res["backend"] == "nccl" and res["world_size"] == torch.cuda.device_count()
    assert res["grad_max_diff_across_ranks"] == 0.0
