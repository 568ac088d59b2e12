"""Benchmarks printed by `make bench-*` (never timed tests).

Usage: python -m bmp_lightning.tools.bench what=data|pose|det|loop
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import bmp_lightning.data.datasets as datasets
import bmp_lightning.data.pipeline as pipeline
import bmp_lightning.data.transforms as transforms
import bmp_lightning.structures.jpeg_region as jpeg_region
import bmp_lightning.structures.records as records
from bmp_lightning.data.codec import UDPHeatmap
from bmp_lightning.data.datasets import TopDownPoseDataset
from bmp_lightning.data.pipeline import Compose, build_pose_pipeline
from bmp_lightning.data.readers import read_coco_keypoints
from bmp_lightning.models.components.pose_net import vitpose_tiny
from bmp_lightning.pose import PoseEstimator
from bmp_lightning.tools import bench_det, bench_loop, bench_pose
from bmp_lightning.tools.bench_pose import sample_scene
from bmp_lightning.utils.cli import parse_key_values
from bmp_lightning.utils.timing import best_time

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("BMP_SHARED_DIR", ROOT.parent / "shared"))


# MMPose 1.3.2 (mmcv 2.1.0 without ops, mmengine 0.10.7, OpenCV 5.0.0, numpy 2.4.6) with the pipelines of its
# ViTPose-B config (td-hm_ViTPose-base_8xb64-210e_coco-256x192.py: no photometric augmentation), CocoDataset on the
# same 12 people, the same protocol, measured side by side with this benchmark on the project's 2-core development
# machine (2026-12-05), in samples per CPU-second; issue 10's figures from another machine were 217 / 345.
MMPOSE_SAMPLES_PER_S = {"train": 278.0, "val": 454.0}
PIPELINES = [("train", "ViTPose"), ("train", "MaskPose"), ("val", "ViTPose"), ("val", "MaskPose")]


def pose_dataset(split: str, model: str, reference: bool = False):
    """The dataset a PoseDataModule builds for ``split``/``model`` on the 12 people of the shared COCO sample: the
    paper recipe (no photometric augmentation, as MMPose's config), uint8 crops (normalised on the device)."""

    coco = SHARED / "data" / "coco"
    if not coco.is_dir():
        raise SystemExit(f"bench-data needs the shared sample data ({SHARED.name}/data/coco beside the project)")
    records = read_coco_keypoints(coco / "test_coco.json", coco, source="coco")
    use_mask = model == "MaskPose"
    pipeline = build_pose_pipeline(
        train=split == "train", use_mask=use_mask, photometric=False, roi=not reference, warp_mask=False
    )
    return TopDownPoseDataset(records, pipeline, normalize=False, use_mask=use_mask)


def samples_per_s(ds, epochs: int = 20, repeats: int = 7) -> tuple[float, float]:
    """The issue's protocol: ``dataset[i]`` over ``epochs`` epochs (images read from disk every time), median of
    ``repeats`` after one warm-up, in this process. Returns (samples per wall second, samples per CPU second of this
    process); the second is what one core delivers even when other jobs share the machine."""
    import statistics

    def run() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                ds[i]
        n = epochs * len(ds)
        return n / (time.perf_counter() - t), n / max(time.process_time() - c, 1e-9)

    run()
    rates = [run() for _ in range(repeats)]
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def profile_sample(ds, epochs: int = 20) -> list[tuple[str, float]]:
    """CPU ms per sample of each step of ``ds[i]`` (timed by wrapping the steps; the rest is the dataset's glue).
    CPU time of this process, so other jobs on the machine do not inflate the figures."""
    from contextlib import ExitStack
    from unittest import mock

    totals: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.process_time() - t

        return wrapper

    steps = [
        (datasets, "open_image", "image file read + JPEG structure check"),
        (jpeg_region, "decode_jpeg_region", "JPEG decode of the box the crop reads"),
        (records.PersonRecord, "mask", "mask: RLE runs parsed (decoded lazily, by box)"),
        (pipeline, "transform_streams", "per-transform random streams"),
        (transforms.MaskBackground, "apply_region", "MaskBackground on the region (incl. perturbation)"),
        (transforms, "perturb_mask_region", "  of which mask perturbation"),
        (transforms.MaskBackground, "dim_background", "  of which background dimming"),
        (pipeline, "warp_region", "warp of flipped / masked pixels (incl. copy)"),
        (transforms.cv2, "warpAffine", "  cv2.warpAffine (all warps)"),
        (transforms.GenerateTarget, "__call__", "heatmap encoding"),
    ]
    with ExitStack() as stack:
        for owner, attr, label in steps:
            stack.enter_context(mock.patch.object(owner, attr, timed(label, getattr(owner, attr))))
        t = time.process_time()
        n = 0
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                ds[i]
                n += 1
        total = time.process_time() - t
    out = [("total", 1e3 * total / n)]
    out += [(label, 1e3 * totals.get(label, 0.0) / n) for _, _, label in steps]
    return out


def decode_floor(ds) -> dict[str, float]:
    """CPU ms per validation sample of ``ds`` (a val dataset of :func:`pose_dataset`) for: OpenCV's whole decode,
    the region decode of the crop's source box, the entropy decoding alone up to the box's last row (a 1-pixel
    box on that row: a baseline JPEG cannot skip it), and the warp; best of 5 x 20 per sample, then averaged."""
    import cv2

    def best(fn, *args) -> float:
        out = float("inf")
        for _ in range(5):
            t = time.process_time()
            for _ in range(20):
                fn(*args)
            out = min(out, (time.process_time() - t) / 20)
        return 1e3 * out

    affine = transforms.TopdownAffine((192, 256), 1.25)
    sums = dict.fromkeys(("whole", "box", "entropy", "warp"), 0.0)
    for i in range(len(ds)):
        s = transforms.GetBBoxCenterScale(1.25)(ds.load_sample(i), None)
        mat = affine.geometry(s)[0]
        h, w = s["ori_shape"]
        box = pipeline.source_region(mat, affine.input_size, w, h)
        data = Path(s["image_path"]).read_bytes()
        buf = np.frombuffer(data, np.uint8)
        info = jpeg_region.parse_jpeg(data)
        sums["whole"] += best(cv2.imdecode, buf, cv2.IMREAD_COLOR)
        sums["warp"] += best(cv2.warpAffine, cv2.imdecode(buf, cv2.IMREAD_COLOR), mat, affine.input_size)
        if info is not None and jpeg_region.available():
            sums["box"] += best(jpeg_region.decode_jpeg_region, data, box, info)
            sums["entropy"] += best(jpeg_region.decode_jpeg_region, data, (0, box[3] - 1, 1, box[3]), info)
    return {k: v / len(ds) for k, v in sums.items()}


def bench_pose_crops(n_boxes: int = 16) -> tuple[float, float]:
    """PoseEstimator crop preparation for ``n_boxes`` masked people on one image: ms per image region-first and in
    the full-image order (MaskBackground over the whole image per person, then the warp)."""

    img, boxes, masks, _ = sample_scene(n_boxes)
    est = PoseEstimator(vitpose_tiny(num_keypoints=21, img_size=(256, 192)), use_mask=True, flip_test=False)
    full = Compose([est._center_scale, est._mask_bg, est._affine])
    zeros = {"keypoints": np.zeros((1, 2), np.float32), "keypoints_visible": np.zeros(1, np.float32)}

    def full_order():
        for box, mask in zip(boxes, masks, strict=True):
            full({"img": img, "bbox": box, "mask": mask, **zeros}, np.random.default_rng(0))

    region = best_time(lambda: est._crops(img, boxes, list(masks)), repeats=7)
    reference = best_time(full_order, repeats=7)
    return 1e3 * region, 1e3 * reference


def bench_data() -> None:
    import cv2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as inside a DataLoader worker
    cv2.setNumThreads(1)
    epochs = int(os.environ.get("BENCH_EPOCHS", "20"))
    repeats = int(os.environ.get("BENCH_REPEATS", "7"))
    reference = os.environ.get("BENCH_REFERENCE", "0") == "1"
    print(
        f"Data pipelines, 1 process: 12 COCO people (../shared/data/coco), images read every sample, {epochs} epochs,"
    )
    print(f"median of {repeats} after a warm-up; uint8 crops (normalised on the device); goal 1.5x MMPose (issue 10;")
    print("MMPose 1.3.2, ViTPose-B config, same protocol, measured side by side on the 2-core development machine).")
    print("Per CPU-second: the rate of one core even when other jobs share the machine.")
    for split, model in PIPELINES:
        rate, cpu_rate = samples_per_s(pose_dataset(split, model), epochs, repeats)
        mm = MMPOSE_SAMPLES_PER_S[split]
        line = (
            f"  {split:5s} {model:8s} {rate:7.1f} samples/s, {cpu_rate:7.1f} per CPU-second"
            f"  ({cpu_rate / mm:.2f}x MMPose {mm:.0f} per CPU-second, goal {1.5 * mm:.0f})"
        )
        if reference:
            ref, ref_cpu = samples_per_s(pose_dataset(split, model, reference=True), epochs, repeats)
            line += f"  full-image reference order: {ref:.1f}, {ref_cpu:.1f} per CPU-second"
        print(line, flush=True)
    lib = jpeg_region._library()
    print(
        "JPEG region decoding: "
        + (f"on (libjpeg-turbo of Pillow, {Path(lib.path).name})" if lib else "off (whole images decoded)")
    )
    print("Profile of one MaskPose train sample (CPU ms):")
    for label, ms in profile_sample(pose_dataset("train", "MaskPose"), epochs=max(epochs // 2, 1)):
        print(f"  {label:52s} {ms:6.2f}")
    floor = decode_floor(pose_dataset("val", "ViTPose"))
    least = floor["entropy"] + floor["warp"]
    print(
        f"Val floor (CPU ms per sample): whole decode {floor['whole']:.2f}, the crop's box {floor['box']:.2f}, "
        f"of which entropy decoding to the box's last row {floor['entropy']:.2f}; warp {floor['warp']:.2f} -> at most "
        f"{1e3 / least:.0f} samples/s with nothing else (goal {1.5 * MMPOSE_SAMPLES_PER_S['val']:.0f})"
    )
    region, full = bench_pose_crops(16)
    print(f"PoseEstimator crops, 16 masked people on one image: {region:.1f} ms region-first, {full:.1f} ms full-image")

    torch.set_num_threads(threads)

    codec = UDPHeatmap()
    n = int(os.environ.get("BENCH_DECODER_N", "1024"))
    hm = torch.rand(n, 21, 64, 48)
    sec = best_time(lambda: codec.decode(hm))
    threads = torch.get_num_threads()
    print(f"DARK-UDP decoder, batch of {n}x21 heatmaps (CPU, {threads} threads): {n / sec:.0f} instances/s")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bmp_lightning.tools.bench what=data|pose|det|loop`` (threads: ``BENCH_THREADS``, default 2)."""
    args = parse_key_values(sys.argv[1:] if argv is None else argv, main.__doc__ or "")
    what = args.get("what")
    if what not in BENCHES or set(args) != {"what"}:
        raise SystemExit(f"usage: {main.__doc__}")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    BENCHES[what]()


BENCHES = {"data": bench_data, "pose": bench_pose.main, "det": bench_det.main, "loop": bench_loop.main}

if __name__ == "__main__":
    main()
