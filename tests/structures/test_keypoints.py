"""The 21-keypoint schema against tables typed independently from the reference (names, not indices)."""

import numpy as np
import pytest
import torch

from bmp_lightning.data.codec import flip_test_heatmaps
from bmp_lightning.data.transforms import RandomFlip
from bmp_lightning.metrics.oks import default_sigmas
from bmp_lightning.structures import keypoints as kp

# Typed from the dataset documentation by joint *name*: source joint -> merged joint.
MPII_BY_NAME = {
    "right_ankle": "right_ankle", "right_knee": "right_knee", "right_hip": "right_hip", "left_hip": "left_hip",
    "left_knee": "left_knee", "left_ankle": "left_ankle", "pelvis": "pelvis", "thorax": "thorax",
    "upper_neck": "neck", "head_top": "top_head", "right_wrist": "right_wrist", "right_elbow": "right_elbow",
    "right_shoulder": "right_shoulder", "left_shoulder": "left_shoulder", "left_elbow": "left_elbow",
    "left_wrist": "left_wrist",
}  # fmt: skip
AIC_BY_NAME = {
    "right_shoulder": "right_shoulder", "right_elbow": "right_elbow", "right_wrist": "right_wrist",
    "left_shoulder": "left_shoulder", "left_elbow": "left_elbow", "left_wrist": "left_wrist",
    "right_hip": "right_hip", "right_knee": "right_knee", "right_ankle": "right_ankle", "left_hip": "left_hip",
    "left_knee": "left_knee", "left_ankle": "left_ankle", "head_top": "top_head",
    "neck": "thorax",  # the released weights put AIC's neck into the thorax slot
}  # fmt: skip
CROWDPOSE_BY_NAME = {
    "left_shoulder": "left_shoulder", "right_shoulder": "right_shoulder", "left_elbow": "left_elbow",
    "right_elbow": "right_elbow", "left_wrist": "left_wrist", "right_wrist": "right_wrist", "left_hip": "left_hip",
    "right_hip": "right_hip", "left_knee": "left_knee", "right_knee": "right_knee", "left_ankle": "left_ankle",
    "right_ankle": "right_ankle", "head": "top_head", "neck": "neck",
}  # fmt: skip
COCO_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
]  # fmt: skip
# Indices written out by hand (docs/method.md#dataset-mappings), a second independent table.
MPII_TABLE = {0: 16, 1: 14, 2: 12, 3: 11, 4: 13, 5: 15, 6: 20, 7: 17, 8: 18, 9: 19, 10: 10, 11: 8, 12: 6, 13: 5,
              14: 7, 15: 9}  # fmt: skip
AIC_TABLE = {0: 6, 1: 8, 2: 10, 3: 5, 4: 7, 5: 9, 6: 12, 7: 14, 8: 16, 9: 11, 10: 13, 11: 15, 12: 19, 13: 17}


def test_names_and_extras():
    assert len(kp.KEYPOINTS) == 21
    assert list(kp.KEYPOINTS[:17]) == COCO_NAMES
    assert kp.KEYPOINTS[17:] == ("thorax", "neck", "top_head", "pelvis")


@pytest.mark.parametrize(
    "source,names,by_name",
    [("mpii", kp.MPII_KEYPOINTS, MPII_BY_NAME), ("aic", kp.AIC_KEYPOINTS, AIC_BY_NAME),
     ("crowdpose", kp.CROWDPOSE_KEYPOINTS, CROWDPOSE_BY_NAME)],
)  # fmt: skip
def test_mapping_by_name(source, names, by_name):
    mapping = kp.SOURCE_MAPPINGS[source]
    assert len(mapping) == len(names) == kp.SOURCE_NUM_KEYPOINTS[source]
    for i, name in enumerate(names):
        assert kp.KEYPOINTS[mapping[i]] == by_name[name], (source, name)


def test_mapping_by_index():
    assert kp.SOURCE_MAPPINGS["mpii"] == MPII_TABLE
    assert kp.SOURCE_MAPPINGS["aic"] == AIC_TABLE
    for src in ("coco", "ochuman"):
        assert kp.SOURCE_MAPPINGS[src] == {i: i for i in range(17)}


def test_flip_and_body_parts():
    expected = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 17, 18, 19, 20]
    assert list(kp.FLIP_INDICES) == expected
    assert list(kp.COCO_FLIP_INDICES) == expected[:17]
    assert sorted(kp.UPPER_BODY_IDS + kp.LOWER_BODY_IDS) == list(range(21))
    for a, b in enumerate(kp.FLIP_INDICES):  # flips pair left with right
        na, nb = kp.KEYPOINTS[a], kp.KEYPOINTS[b]
        assert na.replace("left", "X").replace("right", "X") == nb.replace("left", "X").replace("right", "X")


def test_sigmas():
    assert len(kp.SIGMAS) == 21
    assert kp.SIGMAS[17:] == (0.079, 0.079, 0.035, 0.107)
    assert kp.SIGMAS[5] == kp.SIGMAS[17] and kp.SIGMAS[3] == kp.SIGMAS[19] and kp.SIGMAS[11] == kp.SIGMAS[20]
    assert len(kp.SKELETON) == 24


def test_to_merged_round_trip():
    rng = np.random.default_rng(0)
    for src, n in kp.SOURCE_NUM_KEYPOINTS.items():
        k = rng.random((3, n, 3)).astype(np.float32)
        merged = kp.to_merged(k, src)
        assert merged.shape == (3, 21, 3)
        np.testing.assert_array_equal(kp.from_merged(merged, src), k)
        unmapped = sorted(set(range(21)) - set(kp.SOURCE_MAPPINGS[src].values()))
        assert np.all(merged[:, unmapped] == 0)  # unmapped slots: visibility 0 -> zero loss weight
    with pytest.raises(ValueError, match="mpii keypoints need 16"):
        kp.to_merged(np.zeros((17, 3)), "mpii")


def test_the_default_schema_is_a_value():
    assert kp.BMP21.num_keypoints == 21 and kp.BMP21.keypoints == kp.KEYPOINTS
    assert kp.BMP21.flip_indices() == kp.FLIP_INDICES and kp.BMP21.flip_indices(17) == kp.COCO_FLIP_INDICES
    assert kp.schema_for(21) is kp.BMP21 and kp.schema_for(17) is kp.BMP21 and kp.schema_for(14) is None
    assert kp.flip_indices_for(14)[11:] == (12, 11, 13)  # a smaller head: the first slots, pairs it holds whole
    with pytest.raises(ValueError, match="no keypoint schema with 23"):
        kp.flip_indices_for(23)
    with pytest.raises(ValueError, match="sigmas"):
        kp.KeypointSchema("bad", ("a", "b"), (), (0.1,), (0,), (1,))


def test_a_23_keypoint_schema_is_a_new_value(monkeypatch):
    """Upstream's newer models (MaskPose-1.1.0, PMPose) predict 23 keypoints: a new KeypointSchema value, registered,
    is what the flip test, the training flip and OKS use for 23-channel heads; no module is edited."""
    b = kp.BMP21
    s23 = kp.KeypointSchema(
        "test23", b.keypoints + ("left_big_toe", "right_big_toe"), b.flip_pairs + ((21, 22),),
        b.sigmas + (0.089, 0.088), b.upper_body, b.lower_body + (21, 22),
    )  # fmt: skip
    monkeypatch.setitem(kp.SCHEMAS, 23, s23)  # register_schema(s23), undone after the test
    assert kp.flip_indices_for(23)[21:] == (22, 21) and kp.flip_indices_for(23)[:21] == kp.FLIP_INDICES

    # the flip test of PoseEstimator / PoseLitModule on a 23-channel head
    hm = torch.arange(2 * 23 * 4 * 3, dtype=torch.float32).reshape(2, 23, 4, 3)
    out = flip_test_heatmaps(lambda x: hm, torch.zeros(1, 3, 8, 6), kp.flip_indices_for)
    torch.testing.assert_close(out[0, 21], 0.5 * (hm[0, 21] + hm[1, 22].flip(-1)))

    # the training flip swaps the toes
    sample = {"img": np.zeros((10, 20, 3), np.uint8), "bbox": np.array([2.0, 2.0, 12.0, 8.0]),
              "keypoints": np.zeros((23, 2), np.float32), "keypoints_visible": np.ones(23, np.float32)}  # fmt: skip
    sample["keypoints"][21] = (3.0, 5.0)
    flipped = RandomFlip(prob=1.0)(sample, np.random.default_rng(0))
    np.testing.assert_allclose(flipped["keypoints"][22], (20 - 1 - 3.0, 5.0))

    np.testing.assert_allclose(default_sigmas(23)[-2:], [0.089, 0.088])
