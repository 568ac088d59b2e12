"""Build the three models of the BMP loop from command-line strings (checkpoint paths, hub names, ``tiny_random``).

Used by the evaluation job (``python -m bmp_lightning.bmp``), the demo, ``tools/make_sam_masks``, the notebook and
the benchmarks. ``tiny_random`` gives small randomly initialised networks that exercise every code path offline in
milliseconds; their weights are nudged so that the loop has something to work with (detections above the loop's
0.3 score threshold with person-like boxes, keypoint scores around 0.5 so that SAM gets prompts).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bmp_lightning.detector import Detector
from bmp_lightning.interop.hub import hub_weights, resolve_weights
from bmp_lightning.interop.pose_weights import export_pose_weights
from bmp_lightning.loop.bmp import BMP
from bmp_lightning.loop.config import resolve_loop_config
from bmp_lightning.loop.segmenter import Sam2Segmenter
from bmp_lightning.models.components.rtmdet.rtmdet_ins import rtmdet_ins_tiny
from bmp_lightning.pose import PoseEstimator
from bmp_lightning.structures.files import atomic_torch_save

log = logging.getLogger(__name__)

TINY = "tiny_random"
TINY_POSE_CONFIG = {
    "_target_": "bmp_lightning.models.components.pose_net.vitpose_tiny",
    "num_keypoints": 21,
    "img_size": [256, 192],
}


def _opts(opts: Mapping[str, Any] | None) -> dict[str, Any]:
    """Plain dict of the non-null options (Hydra passes DictConfigs and ``null`` means 'the default')."""
    if not opts:
        return {}
    return {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in dict(opts).items() if v is not None}


def _is_tiny(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().lower() == TINY


# ---------------------------------------------------------------------------------------------- tiny random models
def tiny_random_detector_model(seed: int = 0) -> torch.nn.Module:
    """RTMDet-Ins-tiny (1 class) with random weights that fire: a handful of detections per image with scores
    between 0.3 and 0.5, portrait boxes of about 2 x 4 strides, random instance masks.

    A random network of this depth forgets its input (its outputs barely depend on the image: expect the same
    boxes on every image of a size), which is what a smoke test wants: few, stable, deterministic detections.
    The class logits are calibrated on a fixed noise image so that about 1% of the priors score above 0.3.
    Returns an ``RTMDetIns`` in eval mode.
    """

    model = rtmdet_ins_tiny(num_classes=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() >= 2:  # fan-in scaled
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            else:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(t.shape, generator=g))
        head = model.head
        for reg in head.rtm_reg:
            reg.weight.mul_(0.05)
            reg.bias.copy_(torch.tensor([1.0, 2.0, 1.0, 2.0]))  # (l, t, r, b) in strides: portrait boxes
        model.eval()
        out = model(torch.randn(1, 3, 320, 320, generator=g))
        logits = torch.cat([c.flatten() - cls.bias for c, cls in zip(out["cls_scores"], head.rtm_cls)])
        gain = 1.5 / max(float(logits.std()), 1e-12)
        top = float(torch.quantile(logits * gain, 0.99))
        for cls in head.rtm_cls:
            cls.weight.mul_(gain)
            cls.bias.fill_(math.log(0.3 / 0.7) - top)
    return model.eval()


def tiny_random_pose_net(seed: int = 0) -> torch.nn.Module:
    """``vitpose_tiny`` (21 keypoints, 256x192 input) with heatmaps of height ~0.5, so that keypoint scores pass
    the loop's 0.3 thresholds at random locations inside each box."""
    import hydra

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = hydra.utils.instantiate(TINY_POSE_CONFIG)
    # Calibrate on a fixed noise crop: heatmaps of spread 0.1 around 0.35, so maxima land near 0.5-0.8.
    with torch.no_grad():
        x = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(seed))
        net.eval()
        hm = net(x) - net.head.final_layer.bias.view(1, -1, 1, 1)
        net.head.final_layer.weight.mul_(0.1 / max(float(hm.std()), 1e-12))
        net.head.final_layer.bias.fill_(0.35)
    return net.eval()


def save_tiny_random_checkpoints(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the tiny random detector and pose weights as files the loaders read (``Detector.from_checkpoint``,
    ``PoseEstimator.from_checkpoint``).

    Returns:
        ``{"detector": <dir>/tiny_detector.pt, "pose": <dir>/tiny_maskpose.pth}``.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    det_path = atomic_torch_save(tiny_random_detector_model(seed).state_dict(), out / "tiny_detector.pt")
    pose_path = out / "tiny_maskpose.pth"
    export_pose_weights(tiny_random_pose_net(seed), pose_path, dict(TINY_POSE_CONFIG), use_mask=True)
    return {"detector": det_path, "pose": pose_path}


# ---------------------------------------------------------------------------------------------- loaders
def load_detector(spec: Any, device: str | torch.device = "cpu", opts: Mapping[str, Any] | None = None, **kw: Any):
    """A ``Detector`` from a name (``rtmdet-l-bmp``), a checkpoint path (ours, Lightning ``.ckpt``, MMDetection
    ``.pth``), ``tiny_random``, or
    an existing detector object (returned as is). ``opts`` go to ``Detector`` (``input_size``, ``num_classes``,
    ``score_thr``, ``nms_iou``, ``max_per_img``, ``batch_size``)."""

    if spec is None or spec == "":
        raise ValueError(
            "no detector given: detector=<checkpoint> (ours, a Lightning .ckpt or MMDetection's "
            "rtmdet-ins-l .pth), or detector=tiny_random for an offline smoke check"
        )
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    kw = _opts({**_opts(opts), **kw})
    if _is_tiny(spec):
        kw.pop("num_classes", None)
        kw.setdefault("input_size", 320)
        return Detector(tiny_random_detector_model(int(kw.pop("seed", 0))), device=device, **kw)
    kw.pop("seed", None)
    spec = resolve_weights(spec, key="detector", kind="detector")
    if not Path(spec).is_file():
        raise FileNotFoundError(f"detector checkpoint not found: {spec} (or detector=rtmdet-l-bmp, by name)")
    return Detector.from_checkpoint(spec, device=device, **kw)


def load_pose(spec: Any, device: str | torch.device = "cpu", opts: Mapping[str, Any] | None = None, **kw: Any):
    """A ``PoseEstimator`` from a name (``maskpose-b``, ``vitpose-b-multi``), a checkpoint path (ours, Lightning
    ``.ckpt``, MMPose ``.pth``), ``tiny_random``, or
    an existing estimator (returned as is). ``opts`` go to ``PoseEstimator`` (``use_mask``, ``flip_test``,
    ``batch_size``, ``preset``)."""

    if spec is None or spec == "":
        raise ValueError(
            "no pose model given: pose=<checkpoint> (ours, a Lightning .ckpt or MMPose's MaskPose-b.pth), "
            "or pose=tiny_random for an offline smoke check"
        )
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    kw = _opts({**_opts(opts), **kw})
    if _is_tiny(spec):
        kw.pop("preset", None)
        use_mask = kw.pop("use_mask", True)
        return PoseEstimator(tiny_random_pose_net(int(kw.pop("seed", 0))), use_mask=use_mask, device=device, **kw)
    kw.pop("seed", None)
    w = hub_weights(spec)
    if w is not None and w.kind == "pose":
        kw.setdefault("use_mask", w.name.startswith("maskpose"))
    spec = resolve_weights(spec, key="pose", kind="pose")
    if not Path(spec).is_file():
        raise FileNotFoundError(f"pose checkpoint not found: {spec} (or pose=maskpose-b, by name)")
    return PoseEstimator.from_checkpoint(spec, device=device, **kw)


def load_segmenter(spec: Any, device: str | torch.device = "cpu", opts: Mapping[str, Any] | None = None, **kw: Any):
    """A ``Sam2Segmenter`` from a name (``sam2.1-b+``: Meta's checkpoint), a Meta ``.pt`` file, a Hugging Face
    repository or local directory in transformers format, or ``tiny_random``;
    ``None`` / ``none`` gives ``None`` (the loop then needs ``loop.segmenter=none``).

    ``opts``: ``local_files_only`` (no network), ``resolution`` and ``seed`` for ``tiny_random``, and the
    ``Sam2Segmenter`` arguments (``antialias``, ``chunk``).
    """

    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "null")):
        return None
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    kw = _opts({**_opts(opts), **kw})
    if _is_tiny(spec):
        kw.pop("local_files_only", None)
        return Sam2Segmenter.tiny_random(seed=int(kw.pop("seed", 0)), device=device, **kw)
    kw.pop("seed", None)
    kw.pop("resolution", None)
    return Sam2Segmenter.from_pretrained(os.fspath(spec), device=device, **kw)


def build_bmp(
    detector: Any,
    pose: Any,
    sam: Any,
    loop: Any = "bmp_d3",
    device: str | torch.device = "cpu",
    detector_opts: Mapping[str, Any] | None = None,
    pose_opts: Mapping[str, Any] | None = None,
    sam_opts: Mapping[str, Any] | None = None,
):
    """``BMP`` from model specs (see the loaders); SAM is loaded only when ``loop.segmenter == 'sam2'``."""

    cfg = resolve_loop_config(loop)
    det = load_detector(detector, device, detector_opts)
    pose_model = load_pose(pose, device, pose_opts)
    seg = load_segmenter(sam, device, sam_opts) if cfg.segmenter == "sam2" else None
    if cfg.segmenter == "sam2" and seg is None:
        raise ValueError(
            "loop.segmenter=sam2 needs sam=<name or path> (or sam=tiny_random); or set loop.segmenter=none"
        )
    return BMP(det, pose_model, seg, loop=cfg)
