"""Pose throughput for ``make bench-pose`` (printed figures, never a timed test).

- CPU: ``PoseEstimator`` crops/s (ViT-B, 21 keypoints, flip test, MaskPose input) on a batch of boxes of a real sample
  image (``../shared/data/coco``), or a synthetic image when the sample data is absent; split into the crop
  preparation (box -> mask -> UDP warp) and the network + decode.
- CUDA (when available): bf16-mixed training img/s (forward, MSE loss, backward, AdamW step) and inference crops/s
  (``PoseEstimator``, fp32 and the network alone under bf16 autocast) of ViT-B.

    python -m bmp_lightning.tools.bench what=pose     # BENCH_THREADS=2 by default; BENCH_BOXES=16
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bmp_lightning.data.codec import keypoint_mse_loss
from bmp_lightning.data.readers import read_coco_keypoints
from bmp_lightning.models.components.pose_net import vitpose_b
from bmp_lightning.models.optim import layer_decay_param_groups
from bmp_lightning.pose import PoseEstimator
from bmp_lightning.structures.io import read_image
from bmp_lightning.utils.timing import best_time

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("BMP_SHARED_DIR", ROOT.parent / "shared"))


def sample_scene(n_boxes: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], str]:
    """An RGB image, ``n_boxes`` xyxy boxes ``(N, 4)`` and full-image masks: the real COCO samples' people (cycled,
    jittered by a few pixels) when the shared data is there, else a random-noise image with random boxes."""
    rng = np.random.default_rng(seed)
    coco = SHARED / "data" / "coco"
    if (coco / "test_coco.json").is_file():
        records = read_coco_keypoints(coco / "test_coco.json", coco, source="coco")
        by_image: dict[str, list] = {}
        for rec in records:
            by_image.setdefault(rec.image_path, []).append(rec)
        path, people = max(by_image.items(), key=lambda kv: len(kv[1]))
        img = read_image(path)
        h, w = img.shape[:2]
        boxes, masks = [], []
        for i in range(n_boxes):
            rec = people[i % len(people)]
            boxes.append(rec.bbox + rng.uniform(-3, 3, 4))
            masks.append(rec.mask(h, w) if rec.has_mask else np.ones((h, w), np.uint8))
        return img, np.asarray(boxes, np.float32), masks, f"{Path(path).name} ({len(people)} people, {w}x{h})"
    h, w = 480, 640
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    xy = rng.uniform([0, 0], [w - 200, h - 300], (n_boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform([60, 120], [200, 300], (n_boxes, 2))], 1).astype(np.float32)
    masks = []
    for x1, y1, x2, y2 in boxes.astype(int):
        m = np.zeros((h, w), np.uint8)
        m[y1:y2, x1:x2] = 1
        masks.append(m)
    return img, boxes, masks, f"synthetic noise image {w}x{h} (shared sample data not found)"


def bench_estimator(device: str = "cpu", n_boxes: int = 16, repeats: int = 3) -> dict[str, float]:
    """``PoseEstimator`` (ViT-B, 21 keypoints, flip test, masks) on one image with ``n_boxes`` boxes -> crops/s."""

    img, boxes, masks, what = sample_scene(n_boxes)
    est = PoseEstimator(vitpose_b(num_keypoints=21), use_mask=True, flip_test=True, device=device, batch_size=64)
    sync = device.startswith("cuda")
    total = best_time(lambda: est(img, boxes, masks), repeats=repeats, sync=sync)
    prep = best_time(lambda: est._crops(img, boxes, masks), repeats=repeats)
    print(f"  input: {what}, {n_boxes} boxes, MaskPose masks, flip test")
    print(
        f"  PoseEstimator end to end ({device}): {n_boxes / total:8.1f} crops/s  ({1000 * total / n_boxes:.1f} ms/crop)"
    )
    print(f"    crop preparation (mask, UDP warp; CPU): {n_boxes / prep:8.1f} crops/s")
    print(f"    network x2 (flip) + DARK-UDP decode:    {n_boxes / max(total - prep, 1e-9):8.1f} crops/s")
    return {"crops_per_s": n_boxes / total, "prep_crops_per_s": n_boxes / prep}


def bench_cuda_training(batch_size: int = 64, steps: int = 10) -> float:
    """bf16-mixed training img/s of ViT-B (21 keypoints, drop-path 0.3) at 256x192 on the current CUDA device."""

    dev = torch.device("cuda")
    net = vitpose_b(num_keypoints=21).to(dev).train()
    opt = torch.optim.AdamW(layer_decay_param_groups(net, 5e-4, 0.1, 0.75, 14), lr=5e-4)
    x = torch.randn(batch_size, 3, 256, 192, device=dev)
    target = torch.rand(batch_size, 21, 64, 48, device=dev)
    weights = torch.ones(batch_size, 21, device=dev)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = keypoint_mse_loss(net(x).float(), target, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = best_time(lambda: [step() for _ in range(steps)], repeats=2, warmup=1, sync=True)
    rate = batch_size * steps / sec
    print(f"  training, bf16-mixed, batch {batch_size}: {rate:8.1f} img/s  ({1000 * sec / steps:.0f} ms/step)")
    return rate


def bench_cuda_inference(batch_size: int = 128, steps: int = 10) -> float:
    """Network-only inference crops/s of ViT-B with flip test (2 passes per crop) under bf16 autocast."""

    dev = torch.device("cuda")
    net = vitpose_b(num_keypoints=21).to(dev).eval()
    x = torch.randn(batch_size, 3, 256, 192, device=dev)

    @torch.inference_mode()
    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(steps):
                net(torch.cat([x, x.flip(-1)]))

    sec = best_time(run, repeats=2, warmup=1, sync=True)
    rate = batch_size * steps / sec
    print(f"  inference, network only, bf16, flip test, batch {batch_size}: {rate:8.1f} crops/s")
    return rate


def main() -> None:
    """Print the CPU figures, and the CUDA ones when a GPU is visible."""
    n_boxes = int(os.environ.get("BENCH_BOXES", "16"))
    print("ViTPose-B / MaskPose-B, 256x192, 21 keypoints (random weights; speed does not depend on them)")
    print(f"CPU, {torch.get_num_threads()} threads:")
    bench_estimator("cpu", n_boxes)
    if not torch.cuda.is_available():
        print("CUDA: not available (GPU figures skipped)")
        return
    print(f"CUDA ({torch.cuda.get_device_name(0)}):")
    bench_estimator("cuda", max(n_boxes, 64), repeats=5)
    bench_cuda_inference()
    bench_cuda_training()


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    main()
