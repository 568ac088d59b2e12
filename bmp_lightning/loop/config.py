"""Settings of the BMP loop and its two presets.

``bmp_d3`` is the upstream D3 setting (``configs/bmp_D3.yaml`` of BBoxMaskPose v1.1, "used for most of the
experiments") with the demo's bugs fixed; ``bmp_v1_exact`` switches every upstream quirk back on, to reproduce the
v1.1 demo (``demo/bmp_demo.py``) bit for bit. Each quirk is one boolean/str field so it can be ablated alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

SegmenterKind = Literal["sam2", "none"]
MaskOutMode = Literal["contours", "pixels"]
EmptyPromptFallback = Literal["detector_mask", "zero_points"]


@dataclass
class LoopConfig:
    """Every knob of the BMP loop (docs/recipes.md#bmp-loop-d3).

    Detection: keep ``label == person_label`` with ``score > det_score_thr`` (strict), greedy box NMS at
    ``det_nms_iou``, at most ``max_dets``. Pose-NMS: OKS > ``oks_nms_thr`` between old and new instances, keypoints
    with score > ``confidence_thr`` count as valid. SAM prompts: at most ``num_pos_keypoints`` positive keypoints with
    score >= ``visibility_thr`` (after zeroing keypoints below ``confidence_thr``), ``num_neg_keypoints`` negatives,
    the detector box when ``use_bbox``; one mask per person; masks made exclusive by SAM score.

    Quirk switches (``False``/fixed value = the fixed behaviour of ``bmp_d3``):
        sam_input_bgr: feed SAM the BGR array (v1.1 passes its cv2 image to an RGB model).
        oks_area_from_xyxy_as_xywh: OKS area = x2*y2 (the xyxy box read as xywh), also for the no-visible-keypoint
            fallback box (v1.1); fixed: area = w*h of the xyxy box.
        remove_suppressed_old: drop old instances that pose-NMS suppressed (v1.1 keeps them; HEAD drops them).
        maskout: ``contours`` = external contours with area >= ``maskout_min_area`` filled black (v1.1; fills holes,
            skips specks); ``pixels`` = exactly the mask pixels (HEAD).
        prompt_index_slip: v1.1's farthest-point selection reads the percentile confidences from the unfiltered
            keypoint array with the filtered order (fixed in HEAD).
        nms_plus_one: box NMS with the legacy "+1" pixel area convention (mmpose ``nms``).
        empty_prompt_fallback: what happens when a new person has no keypoint above ``visibility_thr``:
            ``zero_points`` = v1.1 prompts SAM with the first ``num_pos_keypoints`` zeroed keypoints (points at (0,0));
            ``detector_mask`` = skip SAM for that person, keep the detector mask, SAM score 0.
        sam_max_hole_area / sam_max_sprinkle_area: SAM 2 low-res mask clean-up (fill background holes, remove
            foreground specks up to this area). v1.1 configures 10 / 50, but the clean-up needs the ``sam2._C`` CUDA
            extension, which the v1.1 package never builds, so the demo silently skipped it (0 / 0).

    Additions (not upstream; off in both presets):
        maskout_dilate: grow each mask by this many pixels before painting it out (0 = off).
        max_painted_overlap: from iteration 2 on, drop a detection whose own (detector) mask lies on already
            painted-out pixels by more than this fraction, before pose estimation (1.0 = off). Such a detection is a
            person already found, seen again through the rim a coarse mask left visible: a new person is by
            construction on unpainted pixels. Needs a detector with masks (ignored for box-only detectors, whose
            boxes of occluded people overlap painted areas legitimately).
    """

    num_iters: int = 2
    det_score_thr: float = 0.3
    det_nms_iou: float = 0.3
    max_dets: int = 40
    person_label: int = 0
    oks_nms_thr: float = 0.8
    confidence_thr: float = 0.3
    num_pos_keypoints: int = 6
    visibility_thr: float = 0.3
    use_bbox: bool = False
    num_neg_keypoints: int = 0
    exclusive_masks: bool = True
    segmenter: SegmenterKind = "sam2"
    # quirk switches (defaults = fixed behaviour)
    sam_input_bgr: bool = False
    oks_area_from_xyxy_as_xywh: bool = False
    remove_suppressed_old: bool = True
    maskout: MaskOutMode = "contours"
    maskout_min_area: float = 50.0
    prompt_index_slip: bool = False
    nms_plus_one: bool = True
    empty_prompt_fallback: EmptyPromptFallback = "detector_mask"
    sam_max_hole_area: float = 10.0
    sam_max_sprinkle_area: float = 50.0
    # additions (off in both presets = upstream behaviour)
    maskout_dilate: int = 0
    max_painted_overlap: float = 1.0

    def __post_init__(self) -> None:
        if self.segmenter not in ("sam2", "none"):
            raise ValueError(f"loop.segmenter must be 'sam2' or 'none', got {self.segmenter!r}")
        if self.maskout not in ("contours", "pixels"):
            raise ValueError(f"loop.maskout must be 'contours' or 'pixels', got {self.maskout!r}")
        if self.empty_prompt_fallback not in ("detector_mask", "zero_points"):
            raise ValueError(
                "loop.empty_prompt_fallback must be 'detector_mask' or 'zero_points', "
                f"got {self.empty_prompt_fallback!r}"
            )
        if self.maskout_dilate < 0:
            raise ValueError(f"loop.maskout_dilate must be >= 0 pixels, got {self.maskout_dilate}")
        if not 0.0 <= self.max_painted_overlap <= 1.0:
            raise ValueError(f"loop.max_painted_overlap must be in [0, 1] (1 = off), got {self.max_painted_overlap}")
        if self.num_iters < 1:
            raise ValueError(f"loop.num_iters must be >= 1, got {self.num_iters}")


def bmp_d3(**overrides: Any) -> LoopConfig:
    """Upstream D3 (2 iterations, OKS-NMS 0.8, 6 positive keypoint prompts, exclusive masks) with its bugs fixed.

    Fixes relative to the v1.1 demo (``bmp_v1_exact``):
        1. SAM gets the RGB image (the demo passed its BGR array to an RGB model).
        2. Pose-NMS OKS area is the box's w*h (the demo read the xyxy box as xywh: x2*y2, which inflates the area
           and hence OKS, more so for people far from the image origin); the fallback box is fixed the same way.
        3. Old instances suppressed by pose-NMS are removed (the demo computed the removal and then ignored it;
           BBoxMaskPose HEAD applies it). As in HEAD, an iteration in which no new instance survives changes nothing.
        4. Farthest-point prompt selection reads confidences of the filtered keypoints (v1.1 indexing slip, fixed
           in HEAD).
        5. A person without any keypoint above the visibility threshold keeps its detector mask instead of being
           prompted with points at (0, 0).
        6. SAM 2's configured hole (10 px) / sprinkle (50 px) clean-up is applied (skipped by the demo for lack of the
           CUDA extension).
    Kept as upstream: contour mask-out (holes filled, specks < 50 px skipped), box NMS with the "+1" convention.
    """
    return dataclasses.replace(LoopConfig(), **overrides)


# The fields in which the v1.1 demo differs from ``bmp_d3`` (conf/loop/bmp_v1_exact.yaml lists the same delta).
V1_EXACT_QUIRKS: dict[str, Any] = {
    "sam_input_bgr": True,
    "oks_area_from_xyxy_as_xywh": True,
    "remove_suppressed_old": False,
    "prompt_index_slip": True,
    "empty_prompt_fallback": "zero_points",
    "sam_max_hole_area": 0.0,
    "sam_max_sprinkle_area": 0.0,
}


def bmp_v1_exact(**overrides: Any) -> LoopConfig:
    """The v1.1 demo loop bit for bit: every quirk of ``LoopConfig`` switched on (see ``bmp_d3`` for the list)."""
    return dataclasses.replace(LoopConfig(**V1_EXACT_QUIRKS), **overrides)


PRESETS = {"bmp_d3": bmp_d3, "bmp_v1_exact": bmp_v1_exact}


def resolve_loop_config(loop: str | LoopConfig | dict | Any) -> LoopConfig:
    """A preset name (``bmp_d3``, ``bmp_v1_exact``), a ``LoopConfig``, or a mapping of fields (e.g. a DictConfig)."""
    if isinstance(loop, LoopConfig):
        return loop
    if isinstance(loop, str):
        if loop not in PRESETS:
            raise ValueError(f"unknown loop preset {loop!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[loop]()
    try:
        items = dict(loop.items())
    except AttributeError:
        raise TypeError(f"loop must be a preset name, a LoopConfig or a mapping, got {type(loop).__name__}") from None
    items.pop("_target_", None)
    preset = items.pop("preset", "bmp_d3")
    return PRESETS[preset](**items)


def register_loop_schema() -> None:
    """Store ``LoopConfig``'s defaults as the Hydra config ``loop/base``.

    ``conf/loop/bmp_d3.yaml`` derives from it and ``bmp_v1_exact.yaml`` from ``bmp_d3``, so the dataclass stays the
    one source of the defaults while every field is still in the composed config (overrides need no ``+``).
    """
    from hydra.core.config_store import ConfigStore

    node = {"_target_": f"{__name__}.LoopConfig", **dataclasses.asdict(LoopConfig())}
    ConfigStore.instance().store(group="loop", name="base", node=node)


register_loop_schema()
