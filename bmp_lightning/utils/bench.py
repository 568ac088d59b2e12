"""Benchmarks printed by `make bench-*` (never timed tests).

Usage: python -m bmp_lightning.utils.bench data|pose|det|loop
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("BMP_SHARED_DIR", ROOT.parent / "shared"))


def _timeit(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_data(n_samples: int = 200) -> None:
    from bmp_lightning.data.codec import UDPHeatmap
    from bmp_lightning.data.datasets import TopDownPoseDataset
    from bmp_lightning.data.readers import read_coco_keypoints
    from bmp_lightning.data.transforms import build_pose_pipeline

    coco = SHARED / "data" / "coco"
    if not coco.is_dir():
        raise SystemExit(f"bench-data needs the shared sample data ({SHARED.name}/data/coco beside the project)")
    records = read_coco_keypoints(coco / "test_coco.json", coco, source="coco")
    pipeline = build_pose_pipeline(train=True, use_mask=True)
    ds = TopDownPoseDataset(records, pipeline)
    ds[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as inside a DataLoader worker
    t = time.perf_counter()
    for i in range(n_samples):
        ds[i % len(ds)]
    dt = time.perf_counter() - t
    print(f"MaskPose train pipeline (real COCO samples, 1 worker): {n_samples / dt:.1f} samples/s")

    torch.set_num_threads(threads)
    codec = UDPHeatmap()
    hm = torch.rand(1024, 21, 64, 48)
    sec = _timeit(lambda: codec.decode(hm))
    threads = torch.get_num_threads()
    print(f"DARK-UDP decoder, batch of 1024x21 heatmaps (CPU, {threads} threads): {1024 / sec:.0f} instances/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["data", "pose", "det", "loop"])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.what == "data":
        bench_data()
    else:
        from importlib import import_module

        import_module(f"bmp_lightning.utils.bench_{args.what}").main()


if __name__ == "__main__":
    main()
