"""Detector speed for ``make bench-det`` (printed figures, never a timed test).

- ``Detector`` seconds per image at 640x640 (keep-ratio resize + pad, BGR normalisation, forward, post-processing) for
  RTMDet-Ins-L and -tiny with **random weights** (the released weights are not needed for timing). A random network
  scores nothing above the 0.05 threshold, so the default run times the forward pass plus an empty post-processing;
  the ``score_thr=0`` run keeps ``max_per_img`` = 100 detections, the worst case of the mask post-processing.
- RTMDet-Ins-tiny training step (forward, criterion with assignment, backward, AdamW) on a synthetic batch.
- CUDA (when available): the same for RTMDet-Ins-L, training under bf16 autocast.

    python -m bmp_lightning.tools.bench what=det     # BENCH_THREADS=2 by default
"""

from __future__ import annotations

import numpy as np
import torch

from bmp_lightning.data.synthetic.scene import sample_scene
from bmp_lightning.detector import Detector
from bmp_lightning.models.components.rtmdet.rtmdet_ins import rtmdet_ins
from bmp_lightning.models.instseg_module import InstSegLitModule, rtmdet_param_groups
from bmp_lightning.utils.timing import best_time


def _image(seed: int = 0) -> np.ndarray:
    """A 256x320 synthetic crowd scene (RGB uint8): resized to 512x640 by the Detector."""

    return sample_scene(np.random.default_rng([seed, 0]), (256, 320)).image


def bench_detector(size: str, device: str = "cpu", repeats: int = 3) -> dict[str, float]:
    """``Detector`` s/img at 640 for a random RTMDet-Ins of ``size``: default test config and ``score_thr=0``."""

    torch.manual_seed(0)
    model = rtmdet_ins(size, num_classes=1)
    img = _image()
    sync = device.startswith("cuda")
    out = {}
    for thr in (0.05, 0.0):
        det = Detector(model, device=device, score_thr=thr, input_size=640, batch_size=1)
        n = len(det(img)[0]["scores"])
        out[f"thr{thr}"] = best_time(lambda det=det: det(img), repeats=repeats, sync=sync)
        out[f"n{thr}"] = n
    return out


def bench_train_step(size: str, batch: int, input_size: int, device: str = "cpu", repeats: int = 3) -> float:
    """Seconds per training step (forward, RTMDet-Ins criterion, backward, AdamW) on a synthetic batch."""

    torch.manual_seed(0)
    module = InstSegLitModule(rtmdet_ins(size, num_classes=1), ema=True).to(device)
    opt = torch.optim.AdamW(rtmdet_param_groups(module.model, 0.05), lr=1e-4)
    imgs, targets = [], []
    for i in range(batch):
        scene = sample_scene(np.random.default_rng([1, i]), (input_size, input_size))
        imgs.append(torch.from_numpy(scene.image).permute(2, 0, 1).float())
        masks = torch.from_numpy(scene.masks)
        keep = (masks.flatten(1) > 0).any(1)
        ys, xs = [], []
        for m in masks[keep]:
            yx = m.nonzero()
            ys.append((yx[:, 0].min(), yx[:, 0].max() + 1))
            xs.append((yx[:, 1].min(), yx[:, 1].max() + 1))
        boxes = torch.tensor([[x[0], y[0], x[1], y[1]] for x, y in zip(xs, ys)], dtype=torch.float32).reshape(-1, 4)
        targets.append({"boxes": boxes.to(device), "labels": torch.zeros(len(boxes), dtype=torch.long, device=device),
                        "masks": masks[keep].to(device)})  # fmt: skip
    x = torch.stack(imgs).to(device)
    cuda = device.startswith("cuda")
    module.train()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            losses = module.criterion(module(x), targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.ema_model.update(module.model)

    return best_time(step, repeats=repeats, sync=cuda)


def main() -> None:
    threads = torch.get_num_threads()
    print(f"RTMDet-Ins Detector, RANDOM weights, 256x320 synthetic scene resized+padded to 640x640, batch 1, "
          f"CPU ({threads} threads)")  # fmt: skip
    for size in ("l", "tiny"):
        r = bench_detector(size, "cpu", repeats=2 if size == "l" else 5)
        print(f"  RTMDet-Ins-{size:<4s}  {r['thr0.05']:.3f} s/img (score_thr 0.05: {r['n0.05']} detections)   "
              f"{r['thr0.0']:.3f} s/img (score_thr 0: {r['n0.0']} detections with masks)")  # fmt: skip
    sec = bench_train_step("tiny", 4, 320, "cpu")
    print(f"  RTMDet-Ins-tiny training step, batch 4 at 320x320 (fwd + criterion + bwd + AdamW + EMA): {sec:.2f} s")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        r = bench_detector("l", "cuda", repeats=10)
        print(f"CUDA ({name}): RTMDet-Ins-L Detector {r['thr0.05'] * 1e3:.1f} ms/img (fp32, random weights), "
              f"{r['thr0.0'] * 1e3:.1f} ms/img with 100 masks")  # fmt: skip
        sec = bench_train_step("l", 16, 640, "cuda", repeats=5)
        print(f"CUDA ({name}): RTMDet-Ins-L training step, batch 16 at 640 (bf16 autocast): {sec:.3f} s "
              f"({16 / sec:.1f} img/s)")  # fmt: skip


if __name__ == "__main__":
    main()
