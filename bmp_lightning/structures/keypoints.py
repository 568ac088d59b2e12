"""Keypoint schemas as values; :data:`BMP21` is BBoxMaskPose's 21-keypoint schema (COCO-17 + thorax, neck,
top_head, pelvis), the default.

Reference: ``configs/_base_/merged_COCO_AIC_MPII.py`` of BBoxMaskPose v1.0 (the schema of the released 21-channel
weights). Source datasets are merged by scattering their columns into these slots (``SOURCE_MAPPINGS``); slots a
source does not annotate get visibility 0 and therefore zero loss weight.

A :class:`KeypointSchema` holds names, flip pairs, OKS sigmas, upper / lower body, skeleton and the source
mappings. The code that depends on the schema (transforms, the flip test of ``PoseLitModule`` / ``PoseEstimator``,
OKS sigmas) looks it up by keypoint count with :func:`schema_for`, so a new schema (upstream's 23-keypoint models)
is a new value passed to :func:`register_schema`, not an edit of every module. The module constants below
(``KEYPOINTS``, ``FLIP_INDICES``, ``SIGMAS``...) are :data:`BMP21`'s fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class KeypointSchema:
    """A keypoint schema: what a pose network's heatmap channels mean.

    Args:
        name: short name (``bmp21``).
        keypoints: slot names, in channel order.
        flip_pairs: left/right slot pairs (midline slots flip onto themselves).
        sigmas: OKS sigmas, one per slot.
        upper_body, lower_body: slot ids of the half-body augmentation.
        skeleton: links between slots (drawing).
        source_mappings: per source dataset, source index -> slot.
        source_num_keypoints: per source dataset, its keypoint count.
        num_coco: the first ``num_coco`` slots are COCO's (a 17-channel head of this schema).
    """

    name: str
    keypoints: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]
    upper_body: tuple[int, ...]
    lower_body: tuple[int, ...]
    skeleton: tuple[tuple[int, int], ...] = ()
    source_mappings: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    source_num_keypoints: Mapping[str, int] = field(default_factory=dict)
    num_coco: int = 17

    def __post_init__(self) -> None:
        k = len(self.keypoints)
        if len(self.sigmas) != k:
            raise ValueError(f"schema {self.name}: {len(self.sigmas)} sigmas for {k} keypoints")
        ids = [i for pair in self.flip_pairs for i in pair] + [*self.upper_body, *self.lower_body]
        ids += [i for link in self.skeleton for i in link]
        ids += [j for m in self.source_mappings.values() for j in m.values()]
        if any(not 0 <= i < k for i in ids):
            raise ValueError(f"schema {self.name}: a slot id outside 0..{k - 1}")
        for src, m in self.source_mappings.items():
            if any(not 0 <= i < self.source_num_keypoints[src] for i in m):
                raise ValueError(f"schema {self.name}: {src} mapping names a joint it does not have")

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoints)

    def flip_indices(self, num: int | None = None) -> tuple[int, ...]:
        """Channel permutation of a horizontal flip, for the first ``num`` slots (default all)."""
        num = self.num_keypoints if num is None else num
        idx = list(range(num))
        for a, b in self.flip_pairs:
            if b < num:
                idx[a], idx[b] = b, a
        return tuple(idx)

    def to_merged(self, keypoints: np.ndarray, source: str) -> np.ndarray:
        """Scatter source keypoints ``(..., K_src, C)`` into the schema's slots ``(..., K, C)``; unmapped slots 0."""
        mapping = self.source_mappings[source]
        keypoints = np.asarray(keypoints)
        if keypoints.shape[-2] != self.source_num_keypoints[source]:
            n = self.source_num_keypoints[source]
            raise ValueError(f"{source} keypoints need {n} joints, got {keypoints.shape[-2]}")
        out = np.zeros(keypoints.shape[:-2] + (self.num_keypoints, keypoints.shape[-1]), dtype=keypoints.dtype)
        out[..., list(mapping.values()), :] = keypoints[..., list(mapping.keys()), :]
        return out

    def from_merged(self, keypoints: np.ndarray, target: str) -> np.ndarray:
        """Gather a target dataset's keypoints ``(..., K_tgt, C)`` from the schema's slots (inverse of
        :meth:`to_merged`)."""
        mapping = self.source_mappings[target]
        order = [mapping[i] for i in range(self.source_num_keypoints[target])]
        return np.asarray(keypoints)[..., order, :]


BMP21 = KeypointSchema(
    name="bmp21",
    keypoints=KEYPOINTS,
    flip_pairs=FLIP_PAIRS,
    sigmas=SIGMAS,
    upper_body=UPPER_BODY_IDS,
    lower_body=LOWER_BODY_IDS,
    skeleton=SKELETON,
    source_mappings=SOURCE_MAPPINGS,
    source_num_keypoints=SOURCE_NUM_KEYPOINTS,
    num_coco=NUM_COCO_KEYPOINTS,
)

FLIP_INDICES: tuple[int, ...] = BMP21.flip_indices()
COCO_FLIP_INDICES: tuple[int, ...] = BMP21.flip_indices(NUM_COCO_KEYPOINTS)

# keypoint count -> schema; a head with the first ``num_coco`` channels of a schema is that schema's COCO part
SCHEMAS: dict[int, KeypointSchema] = {BMP21.num_keypoints: BMP21}


def register_schema(schema: KeypointSchema) -> KeypointSchema:
    """Make ``schema`` the one :func:`schema_for` returns for its keypoint count (a new model family's schema)."""
    SCHEMAS[schema.num_keypoints] = schema
    return schema


def schema_for(num_keypoints: int) -> KeypointSchema | None:
    """The schema of a ``num_keypoints``-channel head: a registered schema of that count, else the default schema
    when ``num_keypoints`` is its COCO part (17), else None."""
    if num_keypoints in SCHEMAS:
        return SCHEMAS[num_keypoints]
    return BMP21 if num_keypoints == BMP21.num_coco else None


def flip_indices_for(num_keypoints: int) -> tuple[int, ...]:
    """Flip permutation of a ``num_keypoints``-channel head: its registered schema's (:func:`schema_for`), else the
    first ``num_keypoints`` slots of the default schema (a head of fewer channels); more channels than any schema
    without a registered one is an error."""
    schema = schema_for(num_keypoints)
    if schema is None and num_keypoints > BMP21.num_keypoints:
        raise ValueError(
            f"no keypoint schema with {num_keypoints} keypoints (known: {sorted(SCHEMAS)}); see register_schema"
        )
    return (schema or BMP21).flip_indices(num_keypoints)


def to_merged(keypoints: np.ndarray, source: str, schema: KeypointSchema = BMP21) -> np.ndarray:
    """Scatter source keypoints ``(..., K_src, C)`` into ``schema``'s slots (default the 21-slot schema)."""
    return schema.to_merged(keypoints, source)


def from_merged(keypoints: np.ndarray, target: str, schema: KeypointSchema = BMP21) -> np.ndarray:
    """Gather a target dataset's keypoints ``(..., K_tgt, C)`` from ``schema``'s slots (inverse of ``to_merged``)."""
    return schema.from_merged(keypoints, target)
