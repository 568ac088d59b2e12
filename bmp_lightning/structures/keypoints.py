"""The 21-keypoint schema of BBoxMaskPose (COCO-17 + thorax, neck, top_head, pelvis).

Reference: ``configs/_base_/merged_COCO_AIC_MPII.py`` of BBoxMaskPose v1.0 (the schema of the released 21-channel
weights). Source datasets are merged by scattering their columns into these slots (``SOURCE_MAPPINGS``); slots a
source does not annotate get visibility 0 and therefore zero loss weight.
"""

from __future__ import annotations

import numpy as np

KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
    "thorax",
    "neck",
    "top_head",
    "pelvis",
)
NUM_KEYPOINTS = len(KEYPOINTS)
NUM_COCO_KEYPOINTS = 17

# The 8 COCO left/right pairs; the 4 extra joints lie on the body's midline and flip onto themselves.
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


def _flip_indices(num: int) -> tuple[int, ...]:
    idx = list(range(num))
    for a, b in FLIP_PAIRS:
        if b < num:
            idx[a], idx[b] = b, a
    return tuple(idx)


FLIP_INDICES: tuple[int, ...] = _flip_indices(NUM_KEYPOINTS)
COCO_FLIP_INDICES: tuple[int, ...] = _flip_indices(NUM_COCO_KEYPOINTS)

UPPER_BODY_IDS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 18, 19)
LOWER_BODY_IDS: tuple[int, ...] = (11, 12, 13, 14, 15, 16, 20)

COCO_SIGMAS: tuple[float, ...] = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip
# thorax/neck as shoulders, top_head as ears, pelvis as hips.
SIGMAS: tuple[float, ...] = COCO_SIGMAS + (0.079, 0.079, 0.035, 0.107)

# Present in the schema file but unused in training (use_dataset_keypoint_weights=False upstream).
JOINT_WEIGHTS: tuple[float, ...] = (
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0,
)  # fmt: skip

_I = {name: i for i, name in enumerate(KEYPOINTS)}
# 24 links: COCO's hip-hip and shoulder-shoulder links replaced by links through pelvis and thorax.
SKELETON: tuple[tuple[int, int], ...] = tuple(
    (_I[a], _I[b])
    for a, b in (
        ("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("right_ankle", "right_knee"),
        ("right_knee", "right_hip"), ("left_hip", "pelvis"), ("left_shoulder", "left_hip"),
        ("right_shoulder", "right_hip"), ("left_shoulder", "thorax"), ("left_shoulder", "left_elbow"),
        ("right_shoulder", "right_elbow"), ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"),
        ("left_eye", "right_eye"), ("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"),
        ("right_eye", "right_ear"), ("left_ear", "left_shoulder"), ("right_ear", "right_shoulder"),
        ("pelvis", "right_hip"), ("right_shoulder", "thorax"), ("thorax", "neck"), ("left_ear", "top_head"),
        ("right_ear", "top_head"),
    )
)  # fmt: skip

MPII_KEYPOINTS: tuple[str, ...] = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis", "thorax",
    "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow",
    "left_wrist",
)  # fmt: skip
AIC_KEYPOINTS: tuple[str, ...] = (
    "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist", "right_hip",
    "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "head_top", "neck",
)  # fmt: skip
CROWDPOSE_KEYPOINTS: tuple[str, ...] = (
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck",
)  # fmt: skip

# source index -> merged index. AIC's neck lands in slot 17 (thorax), as in the released weights.
SOURCE_MAPPINGS: dict[str, dict[int, int]] = {
    "coco": {i: i for i in range(17)},
    "ochuman": {i: i for i in range(17)},
    "mpii": {
        0: 16,
        1: 14,
        2: 12,
        3: 11,
        4: 13,
        5: 15,
        6: 20,
        7: 17,
        8: 18,
        9: 19,
        10: 10,
        11: 8,
        12: 6,
        13: 5,
        14: 7,
        15: 9,
    },  # fmt: skip
    "aic": {0: 6, 1: 8, 2: 10, 3: 5, 4: 7, 5: 9, 6: 12, 7: 14, 8: 16, 9: 11, 10: 13, 11: 15, 12: 19, 13: 17},
    # evaluation only: 12 limb joints from the COCO slots, head <- top_head, neck <- neck
    "crowdpose": {0: 5, 1: 6, 2: 7, 3: 8, 4: 9, 5: 10, 6: 11, 7: 12, 8: 13, 9: 14, 10: 15, 11: 16, 12: 19, 13: 18},
}
SOURCE_NUM_KEYPOINTS: dict[str, int] = {"coco": 17, "ochuman": 17, "mpii": 16, "aic": 14, "crowdpose": 14}
# CrowdPose OKS sigmas (its official evaluation), in CrowdPose order.
CROWDPOSE_SIGMAS: tuple[float, ...] = (
    0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089, 0.079, 0.079,
)  # fmt: skip


def to_merged(keypoints: np.ndarray, source: str) -> np.ndarray:
    """Scatter source keypoints ``(..., K_src, C)`` into the 21-slot schema ``(..., 21, C)``; unmapped slots are 0."""
    mapping = SOURCE_MAPPINGS[source]
    keypoints = np.asarray(keypoints)
    if keypoints.shape[-2] != SOURCE_NUM_KEYPOINTS[source]:
        raise ValueError(f"{source} keypoints need {SOURCE_NUM_KEYPOINTS[source]} joints, got {keypoints.shape[-2]}")
    out = np.zeros(keypoints.shape[:-2] + (NUM_KEYPOINTS, keypoints.shape[-1]), dtype=keypoints.dtype)
    src = list(mapping.keys())
    dst = list(mapping.values())
    out[..., dst, :] = keypoints[..., src, :]
    return out


def from_merged(keypoints: np.ndarray, target: str) -> np.ndarray:
    """Gather a target dataset's keypoints ``(..., K_tgt, C)`` from the 21-slot schema (inverse of ``to_merged``)."""
    mapping = SOURCE_MAPPINGS[target]
    keypoints = np.asarray(keypoints)
    order = [mapping[i] for i in range(SOURCE_NUM_KEYPOINTS[target])]
    return keypoints[..., order, :]
