"""The prepared GPU check (``make gpu-check``): the CUDA paths of the project in one run of at most ~5 minutes.

    python -m bmp_lightning.tools.gpu_check [out=logs/gpu_check.json] [device=cuda] [tiny=false] [steps=20]

Sections (each timed, each failure recorded in the JSON instead of ending the run):

* ``pose_train``: ViTPose-B (21 keypoints) training steps, bf16 autocast, batch 64, on synthetic tensors: samples/s,
  peak memory, FLOPs per sample measured by ``torch.utils.flop_counter`` (forward + backward), model FLOP
  utilisation (MFU) against the GPU's dense bf16 peak;
* ``pose_train_data``: MaskPose-B trained by Lightning (``trainer=gpu``: bf16-mixed) through the real data path: JPEG
  files (synthetic crowds written to disk first) decoded, masked and warped by the DataModule's workers: samples/s
  and the share of the step time spent waiting for the next batch (is the GPU waiting on data?);
* ``pose_estimator``: ``PoseEstimator`` (ViT-B, flip test, masks) crops/s on CUDA, and its heatmaps / keypoints
  against the same network on CPU;
* ``detector``: ``Detector`` (RTMDet-Ins-L, 640) s/img on CUDA, and the raw head outputs against CPU;
* ``bmp_loop``: the BMP loop per image with RTMDet-Ins-L + MaskPose-B + SAM 2.1 hiera-b+ (random weights unless
  cached ones are given to ``make bench-loop``), seconds in detector / pose / SAM per iteration;
* ``ddp``: one DDP training step of ViT-B over all visible GPUs (NCCL), gradients checked equal on every rank.

Without a CUDA device it says so, writes ``{"cuda": false}`` and exits 0. ``device=cpu tiny=true`` runs every
section with tiny models on the CPU (gloo for DDP): what the test suite runs to keep this script working.
Weights are random everywhere: speed does not depend on them, and CPU/GPU agreement is checked on raw outputs.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bmp_lightning.data.codec import keypoint_mse_loss
from bmp_lightning.data.synthetic import sample_scene
from bmp_lightning.detector import Detector
from bmp_lightning.models.components.pose_net import vitpose_b, vitpose_tiny
from bmp_lightning.models.components.rtmdet.rtmdet_ins import rtmdet_ins
from bmp_lightning.pose import PoseEstimator
from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.tools import bench_pose
from bmp_lightning.tools.bench_det import _image
from bmp_lightning.tools.bench_loop import IMAGE_HW, bench_set
from bmp_lightning.utils.cli import parse_key_values

ROOT = Path(__file__).resolve().parents[2]
USAGE = __doc__.split("\n\n")[1]

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets; SXM / PCIe variants by name)
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A40": 150.0, "A10": 125.0,
    "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}  # fmt: skip


def peak_tflops(name: str) -> float | None:
    """The bf16 peak of a device name (longest matching key), ``None`` when unknown."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _pose_net(tiny: bool) -> torch.nn.Module:

    torch.manual_seed(0)
    return vitpose_tiny(num_keypoints=21) if tiny else vitpose_b(num_keypoints=21)


def flops_per_sample(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward + backward FLOPs of one sample (``torch.utils.flop_counter``: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        net(x[:1]).float().sum().backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- sections
def check_pose_train(device: str, tiny: bool, steps: int, batch: int) -> dict[str, Any]:

    net = _pose_net(tiny).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4)
    x = torch.randn(batch, 3, 256, 192, device=device)
    target = torch.rand(batch, 21, 64, 48, device=device)
    weights = torch.ones(batch, 21, device=device)
    flops = flops_per_sample(net, x)
    cuda = device.startswith("cuda")

    def step() -> float:
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = keypoint_mse_loss(net(x).float(), target, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step()  # warm-up: allocations, kernel selection
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    sec = time.perf_counter() - t
    rate = batch * steps / sec
    out = {
        "batch": batch, "steps": steps, "samples_per_s": rate, "ms_per_step": 1000 * sec / steps,
        "gflops_per_sample": flops / 1e9, "achieved_tflops": flops * rate / 1e12, "loss_first": first,
        "loss_last": loss, "finite": bool(np.isfinite([first, loss]).all()),
    }  # fmt: skip
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_tflops(torch.cuda.get_device_name())
        out["mfu"] = flops * rate / (peak * 1e12) if peak else None
    return out


class _StepTimer:
    """Lightning callback: per batch, the wait for it (end of the previous step -> start of this one) and the step
    itself (CUDA synchronised), after ``skip`` warm-up batches."""

    def __new__(cls, *args, **kwargs):  # a Callback subclass built lazily (lightning imported only when used)
        from lightning.pytorch.callbacks import Callback

        class StepTimer(Callback):
            def __init__(self, device: str, skip: int = 2) -> None:
                self.device, self.skip = device, skip
                self.wait: list[float] = []
                self.compute: list[float] = []
                self._end: float | None = None
                self._start = 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                _sync(self.device)
                self._start = time.perf_counter()
                if self._end is not None and trainer.global_step >= self.skip:
                    self.wait.append(self._start - self._end)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                _sync(self.device)
                self._end = time.perf_counter()
                if trainer.global_step > self.skip:
                    self.compute.append(self._end - self._start)

        return StepTimer(*args, **kwargs)


def check_pose_train_data(device: str, tiny: bool, steps: int, batch: int, workers: int) -> dict[str, Any]:
    """Lightning fit of MaskPose on the real data path (JPEG decode + region-first transforms in the workers)."""
    import hydra
    from hydra import compose, initialize_config_dir

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        # JPEG files on disk, decoded and transformed by the DataModule's workers; enough people for one epoch of all
        # the timed steps (~4 people per image, each source of the 3 takes a third of a batch), so that the workers
        # keep prefetching instead of restarting at an epoch boundary
        n_images = int(6.5 * (steps + 4) * batch / 64) + 10
        data = ["data=synthetic", f"data.root={tmp}/synthetic", f"data.synthetic.n_images={n_images}",
                "data.synthetic.val_fraction=0.05", "data.persistent_workers=true"]  # fmt: skip
        source = f"synthetic JPEGs on disk ({n_images} images, generated first)"
        overrides = [
            *data, "model=vitpose_tiny" if tiny else "model=maskpose_b", "model.init_weights=null",
            "model.use_mask=true", "data.use_mask=true", f"data.batch_size={batch}", f"data.num_workers={workers}",
            f"trainer={'gpu' if device.startswith('cuda') else 'cpu'}", "callbacks=none", "~logger",
            f"+trainer.max_steps={steps + 2}", "+trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
            "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", f"paths.output_dir={tmp}/run",
        ]  # fmt: skip
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train.yaml", overrides=overrides)
        datamodule = hydra.utils.instantiate(cfg.data)
        model = hydra.utils.instantiate(cfg.model)
        timer = _StepTimer(device)
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[timer], logger=False)
        trainer.fit(model, datamodule=datamodule)
    wait, compute = sum(timer.wait), sum(timer.compute)
    n = len(timer.compute)
    return {
        "source": source, "batch": batch, "workers": workers, "steps_timed": n,
        "samples_per_s": batch * n / max(wait + compute, 1e-9), "ms_per_step": 1000 * compute / max(n, 1),
        "ms_waiting_for_data_per_step": 1000 * wait / max(len(timer.wait), 1),
        "data_wait_fraction": wait / max(wait + compute, 1e-9), "precision": str(cfg.trainer.get("precision", "32")),
    }  # fmt: skip


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_pose_estimator(device: str, tiny: bool, n_boxes: int) -> dict[str, Any]:

    img, boxes, masks, what = bench_pose.sample_scene(n_boxes)
    net = _pose_net(tiny).eval()
    ref = PoseEstimator(copy.deepcopy(net), use_mask=True, flip_test=True, device="cpu")
    est = PoseEstimator(net, use_mask=True, flip_test=True, device=device)
    est(img, boxes, masks)  # warm-up
    _sync(device)
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        kpts, scores = est(img, boxes, masks)
    _sync(device)
    sec = (time.perf_counter() - t) / reps
    ref_kpts, ref_scores = ref(img, boxes, masks)
    # the networks on the same normalised crops (what __call__ feeds them), flip test included
    crops = est._crops(img, boxes, masks)[0]
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    x = (x - ref._mean) / ref._std
    with torch.inference_mode():
        hm, hm_ref = est._heatmaps(x.to(est.device)), ref._heatmaps(x)
    return {
        "input": what, "boxes": n_boxes, "crops_per_s": n_boxes / sec,
        "heatmap_max_rel_diff_vs_cpu": _max_rel(hm, hm_ref),
        "keypoint_max_abs_diff_px_vs_cpu": float(np.abs(np.asarray(kpts) - np.asarray(ref_kpts)).max()),
        "score_max_abs_diff_vs_cpu": float(np.abs(np.asarray(scores) - np.asarray(ref_scores)).max()),
    }  # fmt: skip


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flat_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat_tensors(v)]
    return []


def check_detector(device: str, tiny: bool) -> dict[str, Any]:

    torch.manual_seed(0)
    size = "tiny" if tiny else "l"
    model = rtmdet_ins(size, num_classes=1).eval()
    ref_model = copy.deepcopy(model)
    img = _image()
    det = Detector(model, device=device, input_size=640, batch_size=1)
    det(img)  # warm-up
    _sync(device)
    reps = 3
    t = time.perf_counter()
    for _ in range(reps):
        out = det(img)
    _sync(device)
    sec = (time.perf_counter() - t) / reps
    x = torch.randn(1, 3, 640, 640, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = _flat_tensors(det.model(x.to(device)))
        want = _flat_tensors(ref_model(x))
    return {
        "model": f"RTMDet-Ins-{size.upper()}", "input_size": 640, "s_per_img": sec,
        "detections": int(len(out[0]["scores"])),
        "head_max_rel_diff_vs_cpu": max(_max_rel(a, b) for a, b in zip(got, want)),
    }  # fmt: skip


def check_bmp_loop(device: str, tiny: bool, n_images: int = 2) -> dict[str, Any]:
    scenes = [sample_scene(np.random.default_rng([2025, i]), IMAGE_HW, min_people=6, max_people=6)
              for i in range(n_images)]  # fmt: skip
    t, notes = bench_set("tiny" if tiny else "full", scenes, device, own_outputs=False)
    mean = t.mean(axis=0)  # (iterations, 4)
    keys = ("detector", "pose", "sam", "total")
    return {
        "models": notes, "images": n_images, "people_per_image": 6,
        "per_iteration_s": [dict(zip(keys, map(float, row))) for row in mean],
        "per_image_s": dict(zip(keys, map(float, mean.sum(axis=0)))),
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, device: str, tiny: bool, batch: int, out: str) -> None:
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    dev = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    net = _pose_net(tiny).to(dev).train()
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[rank] if cuda else None)
    g = torch.Generator().manual_seed(rank)  # every rank its own batch: the all-reduce must make the gradients equal
    x = torch.randn(batch, 3, 256, 192, generator=g).to(dev)
    target = torch.rand(batch, 21, 64, 48, generator=g).to(dev)
    weights = torch.ones(batch, 21, device=dev)
    times = []
    for _ in range(3):
        ddp.zero_grad(set_to_none=True)
        _sync(str(dev))
        t = time.perf_counter()
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = keypoint_mse_loss(ddp(x).float(), target, weights)
        loss.backward()
        _sync(str(dev))
        times.append(time.perf_counter() - t)
    grad = torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None])
    spread = grad.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    low = grad.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    diff = float((spread - low).abs().max())
    if rank == 0:
        Path(out).write_text(json.dumps({
            "world_size": world, "backend": dist.get_backend(), "batch_per_rank": batch,
            "ms_per_step": 1000 * min(times[1:]), "grad_max_diff_across_ranks": diff,
            "samples_per_s": world * batch / min(times[1:]),
        }))  # fmt: skip
    dist.destroy_process_group()


def check_ddp(device: str, tiny: bool, batch: int) -> dict[str, Any]:
    world = torch.cuda.device_count() if device.startswith("cuda") else 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        torch.multiprocessing.spawn(
            _ddp_worker, args=(world, _free_port(), device, tiny, batch, str(out)), nprocs=world, join=True
        )
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------- driver
def _section(name: str, fn: Callable[[], dict], results: dict) -> None:
    t = time.perf_counter()
    try:
        results[name] = {**fn(), "ok": True}
    except Exception as err:  # noqa: BLE001 - a failed section is a result; the others still run
        results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    results[name]["seconds"] = time.perf_counter() - t
    print(f"  {name:<16} {'ok' if results[name]['ok'] else 'FAILED':<7} {results[name]['seconds']:6.1f} s", flush=True)


def run_checks(device: str = "cuda", tiny: bool = False, steps: int = 20, batch: int = 64,
               workers: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Every section on ``device``; the JSON-ready results."""
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    info: dict[str, Any] = {
        "cuda": torch.cuda.is_available(), "device": device, "tiny": tiny, "torch": torch.__version__,
        "visible_gpus": torch.cuda.device_count(),
    }  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["peak_bf16_tflops"] = peak_tflops(info["gpu"])
    results: dict[str, Any] = {"info": info}
    print(f"GPU check on {info.get('gpu', device)} (tiny={tiny}):", flush=True)
    _section("pose_train", lambda: check_pose_train(device, tiny, steps, batch), results)
    _section("pose_train_data", lambda: check_pose_train_data(device, tiny, steps, batch, workers), results)
    _section("pose_estimator", lambda: check_pose_estimator(device, tiny, n_boxes=8 if tiny else 64), results)
    _section("detector", lambda: check_detector(device, tiny), results)
    _section("bmp_loop", lambda: check_bmp_loop(device, tiny), results)
    _section("ddp", lambda: check_ddp(device, tiny, batch=4 if tiny else 32), results)
    return results


def format_table(results: dict[str, Any]) -> str:
    r = {k: v for k, v in results.items() if isinstance(v, dict)}

    def g(section: str, key: str, fmt: str = ".1f") -> str:
        v = r.get(section, {}).get(key)
        return "-" if v is None else format(v, fmt)

    pose = "tiny ViT" if results.get("info", {}).get("tiny") else "ViTPose-B"
    rows = [
        (f"{pose} train, bf16, synthetic tensors", f"{g('pose_train', 'samples_per_s')} samples/s",
         f"peak {g('pose_train', 'peak_memory_gib', '.1f')} GiB, {g('pose_train', 'gflops_per_sample')} GFLOP/sample, "
         f"MFU {g('pose_train', 'mfu', '.1%')}"),
        (f"{pose} (MaskPose) train, real data path", f"{g('pose_train_data', 'samples_per_s')} samples/s",
         f"waiting for data {g('pose_train_data', 'data_wait_fraction', '.0%')} of the step time"),
        ("PoseEstimator (flip, masks)", f"{g('pose_estimator', 'crops_per_s')} crops/s",
         f"heatmaps vs CPU: max rel diff {g('pose_estimator', 'heatmap_max_rel_diff_vs_cpu', '.1e')}"),
        (f"Detector {r.get('detector', {}).get('model', '')} @640", f"{g('detector', 's_per_img', '.3f')} s/img",
         f"head vs CPU: max rel diff {g('detector', 'head_max_rel_diff_vs_cpu', '.1e')}"),
        ("BMP loop per image (det / pose / SAM)",
         f"{r.get('bmp_loop', {}).get('per_image_s', {}).get('total', float('nan')):.3f} s/img",
         ", ".join(f"{k} {v:.3f}" for k, v in r.get("bmp_loop", {}).get("per_image_s", {}).items() if k != "total")),
        (f"DDP step, {g('ddp', 'world_size', 'd')} rank(s) {r.get('ddp', {}).get('backend', '')}",
         f"{g('ddp', 'samples_per_s')} samples/s",
         f"grad diff across ranks {g('ddp', 'grad_max_diff_across_ranks', '.1e')}"),
    ]  # fmt: skip
    failed = [k for k, v in r.items() if v.get("ok") is False]
    lines = [f"{a:<42} {b:>20}  {c}" for a, b, c in rows]
    if failed:
        lines.append(f"FAILED sections: {', '.join(failed)} (errors in the JSON)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:

    args = parse_key_values(sys.argv[1:] if argv is None else argv, USAGE)
    out = Path(args.get("out", "logs/gpu_check.json"))
    tiny = args.get("tiny", "false").lower() in ("1", "true", "yes")
    device = args.get("device", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False): nothing to check on this "
              "machine. `device=cpu tiny=true` runs the sections with tiny models on the CPU.")  # fmt: skip
        atomic_write_json(out, {"info": {"cuda": False, "torch": torch.__version__, "device": device}})
        return 0
    t = time.perf_counter()
    results = run_checks(device, tiny, steps=int(args.get("steps", 20)), batch=int(args.get("batch", 64)),
                         workers=int(args["workers"]) if "workers" in args else None)  # fmt: skip
    results["info"]["total_seconds"] = time.perf_counter() - t
    atomic_write_json(out, results)
    print(format_table(results))
    print(f"total {results['info']['total_seconds']:.0f} s; results in {out}")
    return 1 if any(isinstance(v, dict) and v.get("ok") is False for v in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
