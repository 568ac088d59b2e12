"""The BMP loop: detector -> MaskPose -> pose-NMS -> SAM 2 -> exclusive masks -> mask-out -> repeat."""

from bmp_lightning.loop.bmp import BMP, BMPResult, IterationSnapshot, Person
from bmp_lightning.loop.config import LoopConfig, bmp_d3, bmp_v1_exact, resolve_loop_config
from bmp_lightning.loop.pose_nms import oks_matrix, pose_nms
from bmp_lightning.loop.prompts import select_prompt_keypoints, select_prompts
from bmp_lightning.structures.mask_ops import box_nms, exclusive_masks, mask_out

__all__ = [
    "BMP",
    "BMPResult",
    "IterationSnapshot",
    "LoopConfig",
    "Person",
    "bmp_d3",
    "bmp_v1_exact",
    "box_nms",
    "exclusive_masks",
    "mask_out",
    "oks_matrix",
    "pose_nms",
    "resolve_loop_config",
    "select_prompt_keypoints",
    "select_prompts",
]
