"""BMP loop latency for ``make bench-loop`` (printed figures, never a timed test).

Per image and iteration: seconds in the detector, the pose model and SAM (SAM's image encoder runs once per image,
inside iteration 1's SAM time), for two model sets:

* ``tiny``: the tiny random RTMDet-Ins / MaskPose / SAM 2 of the tests;
* ``full``: the BMP architectures, RTMDet-Ins-L (80 classes) + MaskPose-B (ViT-B, 21 keypoints, flip test) +
  SAM 2.1 hiera-b+ at 1024 px. The official weights cannot be downloaded here, so the networks have **random
  weights** unless given (``BENCH_DETECTOR`` / ``BENCH_POSE`` checkpoint paths, ``BENCH_SAM`` a SAM 2.1 name in the
  Hugging Face cache or a local folder); SAM 2.1 b+ is built from its sizes, no network needed.

Random networks find nobody and give flat heatmaps, so by default every model still runs on the real inputs (its
time is what is measured) but the loop is handed the scene's ground-truth people: half of them in iteration 1, the
rest in iteration 2, with their keypoints (score 0.9) so that SAM gets its 6 prompts. Each iteration then does the
work of a real crowded image. With given weights (``BENCH_DETECTOR`` and ``BENCH_POSE``) the models' own outputs
are used.

    python -m bmp_lightning.tools.bench what=loop     # BENCH_THREADS=2, BENCH_IMAGES=3, BENCH_SIZES=tiny,full,
                                                 # BENCH_DEVICE=cpu, BENCH_PEOPLE=8
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from bmp_lightning.data.synthetic import Scene, sample_scene
from bmp_lightning.detector import Detector
from bmp_lightning.loop.bmp import BMP
from bmp_lightning.loop.build import load_detector, load_pose, load_segmenter
from bmp_lightning.loop.segmenter import Sam2Segmenter
from bmp_lightning.models.components.pose_net import maskpose_b
from bmp_lightning.models.components.rtmdet.rtmdet_ins import rtmdet_ins_l
from bmp_lightning.pose import PoseEstimator

IMAGE_HW = (480, 640)  # OCHuman / COCO-like picture size


def sam2_base_plus_config(image_size: int = 1024):
    """transformers ``Sam2Config`` with the SAM 2.1 hiera-b+ sizes (Meta's ``sam2.1_hiera_b+.yaml``): Hiera embed 112,
    2 heads, stages (2, 3, 16, 3), global attention at blocks 12/16/20, window sizes (8, 4, 14, 7), background
    window position embedding 14x14, FPN 256 over (896, 448, 224, 112) channels; 256-dim prompt encoder / decoder."""
    from transformers import Sam2Config

    s = image_size
    return Sam2Config(
        vision_config={
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "image_size": [s, s],
                "hidden_size": 112,
                "num_attention_heads": 2,
                "blocks_per_stage": [2, 3, 16, 3],
                "embed_dim_per_stage": [112, 224, 448, 896],
                "num_attention_heads_per_stage": [2, 4, 8, 16],
                "window_size_per_stage": [8, 4, 14, 7],
                "global_attention_blocks": [12, 16, 20],
                "window_positional_embedding_background_size": [14, 14],
            },
            "backbone_channel_list": [896, 448, 224, 112],
            "backbone_feature_sizes": [[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
            "fpn_hidden_size": 256,
        },
        prompt_encoder_config={"image_size": s},
    )


def _params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def build_models(size: str, device: str) -> tuple[Any, Any, Any, list[str]]:
    """``(detector, pose, segmenter, description lines)`` of the ``tiny`` or ``full`` model set."""

    if size == "tiny":
        det = load_detector("tiny_random", device)
        pose = load_pose("tiny_random", device)
        sam = load_segmenter("tiny_random", device)
        notes = ["tiny random RTMDet-Ins (320 px) + tiny MaskPose (256x192) + tiny SAM 2 (128 px)"]
    elif size == "full":
        from transformers import Sam2Model

        notes = []
        if os.environ.get("BENCH_DETECTOR"):
            det = load_detector(os.environ["BENCH_DETECTOR"], device)
            notes.append(f"detector weights {os.environ['BENCH_DETECTOR']}")
        else:
            det = Detector(rtmdet_ins_l(num_classes=80), device=device)
            notes.append("RTMDet-Ins-L: RANDOM weights (official .pth not available offline)")
        if os.environ.get("BENCH_POSE"):
            pose = load_pose(os.environ["BENCH_POSE"], device)
            notes.append(f"pose weights {os.environ['BENCH_POSE']}")
        else:
            pose = PoseEstimator(maskpose_b(num_keypoints=21), use_mask=True, device=device)
            notes.append("MaskPose-B: RANDOM weights")
        if os.environ.get("BENCH_SAM"):
            sam = load_segmenter(os.environ["BENCH_SAM"], device, local_files_only=True)
            notes.append(f"SAM weights {os.environ['BENCH_SAM']}")
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                sam = Sam2Segmenter(Sam2Model(sam2_base_plus_config()), device=device)
            notes.append("SAM 2.1 hiera-b+ (1024 px): RANDOM weights, built from its config sizes")
        notes.append(
            f"params: detector {_params(det.model):.1f} M, pose {_params(pose.net):.1f} M, "
            f"SAM {_params(sam.model):.1f} M"
        )
    else:
        raise ValueError(f"unknown model set {size!r}: tiny or full")
    return det, pose, sam, notes


class SceneDetector:
    """Runs the real detector (timed by the loop) and returns the scene's ground-truth people: the first half on the
    first call for an image, the rest on the second, so the loop does a crowded image's work whatever the weights."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self.scene: Scene | None = None
        self.calls = 0

    def reset(self, scene: Scene) -> None:
        self.scene, self.calls = scene, 0

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        self.detector(image)
        n = len(self.scene.masks)
        half = math.ceil(n / 2)
        idx = np.arange(n)[:half] if self.calls == 0 else np.arange(n)[half:]
        self.calls += 1
        masks = self.scene.masks[idx].astype(bool)
        boxes = np.array([_mask_box(m) for m in masks], np.float32).reshape(-1, 4)
        return {"bboxes": boxes, "scores": np.full(len(idx), 0.9, np.float32), "labels": np.zeros(len(idx)),
                "masks": masks}  # fmt: skip


class ScenePose:
    """Runs the real pose model (timed) and returns the ground-truth keypoints of the matching people (score 0.9,
    0.1 where not visible), so SAM gets real prompts."""

    def __init__(self, pose: Any) -> None:
        self.pose_model = pose
        self.scene: Scene | None = None

    def pose(self, image: np.ndarray, bboxes: np.ndarray, masks: np.ndarray | None = None):
        self.pose_model(image, bboxes, masks)
        gt_boxes = np.array([_mask_box(m) for m in self.scene.masks])
        idx = [int(np.abs(gt_boxes - b).sum(1).argmin()) for b in np.asarray(bboxes).reshape(-1, 4)]
        k = self.scene.keypoints[idx]  # (N, 21, 3)
        return k[..., :2], np.where(k[..., 2] > 0, 0.9, 0.1)


def _mask_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def bench_set(size: str, scenes: list[Scene], device: str, own_outputs: bool) -> tuple[np.ndarray, list[str]]:
    """``(images, iterations, 4)`` seconds (detector, pose, SAM, total) and the description lines."""
    det, pose, sam, notes = build_models(size, device)
    if own_outputs:
        bmp, sd, sp = BMP(det, pose, sam, loop="bmp_d3"), None, None
    else:
        sd, sp = SceneDetector(det), ScenePose(pose)
        bmp = BMP(sd, sp, sam, loop="bmp_d3")
    out = []
    for i, scene in enumerate([scenes[0], *scenes]):  # the first run warms up (allocations, lazy inits)
        if sd is not None:
            sd.reset(scene)
            sp.scene = scene
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        res = bmp(scene.image)
        if i == 0:
            continue
        out.append([[it.timings.get(k, 0.0) for k in ("detector", "pose", "sam", "total")] for it in res.iterations])
    return np.array(out), notes


def main() -> None:
    device = os.environ.get("BENCH_DEVICE", "cpu")
    n_images = int(os.environ.get("BENCH_IMAGES", "3"))
    people = int(os.environ.get("BENCH_PEOPLE", "8"))
    sizes = [s.strip() for s in os.environ.get("BENCH_SIZES", "tiny,full").split(",") if s.strip()]
    own = bool(os.environ.get("BENCH_DETECTOR") and os.environ.get("BENCH_POSE"))
    scenes = [
        sample_scene(np.random.default_rng([2025, i]), IMAGE_HW, min_people=people, max_people=people)
        for i in range(n_images)
    ]
    counts = [len(s.masks) for s in scenes]
    where = (
        f"CUDA ({torch.cuda.get_device_name()})"
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"BMP loop latency per image: {where}; {n_images} synthetic {IMAGE_HW[0]}x{IMAGE_HW[1]} images with "
          f"{counts} people, bmp_d3, 2 iterations; mean over images after one warm-up image")  # fmt: skip
    if not own:
        print("the loop is handed the scenes' ground-truth people (half in iteration 1, the rest in iteration 2); "
              "every network still runs on the real inputs")  # fmt: skip
    for size in sizes:
        t, notes = bench_set(size, scenes, device, own)
        print(f"\n[{size}] " + "\n       ".join(notes))
        print(f"{'iteration':>10} {'detector':>9} {'pose':>8} {'SAM':>8} {'total':>8}   (seconds)")
        mean = t.mean(axis=0)
        for k, row in enumerate(mean, 1):
            print(f"{k:>10} " + " ".join(f"{v:>8.3f}" for v in row))
        tot = mean.sum(axis=0)
        print(f"{'per image':>10} " + " ".join(f"{v:>8.3f}" for v in tot))
    print("\nSAM's image encoder runs once per image, in iteration 1's SAM time. Upstream (author, GPU): per iteration "
          "~0.03 s detector, 0.06 s pose, 0.47 s SAM; ~1.12 s per image for 2 iterations.")  # fmt: skip


if __name__ == "__main__":
    main()
