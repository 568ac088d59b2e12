"""``make gpu-check`` (bmp_lightning/tools/gpu_check.py): on a machine without a GPU it says so and exits 0; its
sections run on the CPU with tiny models (``device=cpu tiny=true``), which keeps the CUDA script working where no GPU
is lent. The CUDA runs themselves are tests/tools/test_gpu.py (marker ``gpu``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bmp_lightning.tools import gpu_check as gc

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run([sys.executable, "-m", "bmp_lightning.tools.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = _run([f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device visible" in proc.stdout
    assert json.loads(out.read_text())["info"]["cuda"] is False


def test_peak_tflops_by_device_name() -> None:
    assert gc.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gc.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gc.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gc.peak_tflops("Some Future GPU") is None


def test_flops_per_sample_counts_forward_and_backward() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(10, 20, bias=False), torch.nn.Linear(20, 5, bias=False))
    forward = 2 * 10 * 20 + 2 * 20 * 5
    # backward: both weight gradients, and the input gradient of the second layer only (the input needs none)
    backward = 2 * 10 * 20 + 2 * 2 * 20 * 5
    assert gc.flops_per_sample(net, torch.randn(4, 10)) == forward + backward


def test_sections_on_cpu_with_tiny_models() -> None:
    train = gc.check_pose_train("cpu", tiny=True, steps=2, batch=2)
    assert train["finite"] and train["samples_per_s"] > 0 and train["gflops_per_sample"] > 0
    assert "mfu" not in train, "no MFU without a known GPU peak"
    est = gc.check_pose_estimator("cpu", tiny=True, n_boxes=3)
    assert est["crops_per_s"] > 0
    # CPU against CPU: exactly equal (on CUDA, the gpu-marked tests bound these differences)
    assert est["heatmap_max_rel_diff_vs_cpu"] == 0.0 and est["keypoint_max_abs_diff_px_vs_cpu"] == 0.0
    det = gc.check_detector("cpu", tiny=True)
    assert det["model"] == "RTMDet-Ins-TINY" and det["s_per_img"] > 0 and det["head_max_rel_diff_vs_cpu"] == 0.0
    loop = gc.check_bmp_loop("cpu", tiny=True, n_images=1)
    assert len(loop["per_iteration_s"]) == 2 and loop["per_image_s"]["total"] > 0
    ok = {"pose_train": train, "detector": det, "bmp_loop": loop}
    table = gc.format_table({"info": {"tiny": True}, **{k: {**v, "ok": True} for k, v in ok.items()},
                             "ddp": {"ok": False, "error": "x"}})  # fmt: skip
    assert "tiny ViT train" in table and "FAILED sections: ddp" in table


@pytest.mark.slow
def test_full_cli_on_cpu_tiny(tmp_path: Path) -> None:
    """Every section through the command line, DDP with 2 gloo processes and Lightning on the real data path."""
    out = tmp_path / "gc.json"
    proc = _run(["device=cpu", "tiny=true", "steps=2", "batch=4", "workers=1", f"out={out}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    sections = ("pose_train", "pose_train_data", "pose_estimator", "detector", "bmp_loop", "ddp")
    assert all(res[s]["ok"] for s in sections), {s: res[s].get("error") for s in sections}
    assert res["ddp"]["world_size"] == 2 and res["ddp"]["backend"] == "gloo"
    assert res["ddp"]["grad_max_diff_across_ranks"] == 0.0, "DDP all-reduce leaves every rank the same gradients"
    assert res["pose_train_data"]["steps_timed"] >= 1 and 0 <= res["pose_train_data"]["data_wait_fraction"] < 1
