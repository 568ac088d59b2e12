"""Our SAM 2 (Meta's checkpoint mapped onto transformers' Sam2Model) against Meta's own ``SAM2ImagePredictor``.

The oracle is Meta's code as the PyPI package ``sam2`` 1.1.0 ships it (a third-party packaging of
facebookresearch/sam2 with the SAM 2.1 configs; the ``sam-oracle`` extra).

Both load the same randomly initialised Hiera-tiny SAM 2.1 (Meta's ``{"model": state_dict}`` file), see the same
RGB image and the same keypoint prompts (6 positive points per person, single-mask output, as BBoxMaskPose) and
must give the same masks (mean IoU >= 0.98) and predicted IoU scores (within 1e-3); then again with the mask
post-processing BBoxMaskPose configures (``max_hole_area=10``, ``max_sprinkle_area=50``).

Meta's post-processing needs its CUDA extension (``sam2._C``, connected components); without it (any CPU install,
``SAM2_BUILD_CUDA=0``) ``postprocess_masks`` warns and *skips* hole filling and sprinkle removal. For the second
comparison the test gives Meta's code an 8-connected CPU connected-components (OpenCV) in place of the CUDA op, so
that Meta's own post-processing logic runs.
"""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("sam2") is None:  # not imported here: `import sam2` initialises Hydra's global state
    pytest.skip(
        "Meta's sam2 is the test-only oracle: SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'sam2>=1.1'",
        allow_module_level=True,
    )

from bmp_lightning.interop.sam2_meta import convert_meta_sam2, infer_hiera_size  # noqa: E402
from bmp_lightning.loop.segmenter import Sam2Segmenter  # noqa: E402

HOLE, SPRINKLE = 10.0, 50.0  # BBoxMaskPose v1.1: SAM2ImagePredictor(sam2, max_hole_area=10, max_sprinkle_area=50)


def _cpu_connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sam2.utils.misc.get_connected_components`` (8-connectivity; labels and component areas, 0 on background)
    with OpenCV instead of the CUDA op."""
    m = mask.to(torch.uint8).cpu().numpy()
    labels = np.zeros(m.shape, np.int32)
    areas = np.zeros(m.shape, np.int32)
    for i in range(m.shape[0]):
        _, lab, stats, _ = cv2.connectedComponentsWithStats(m[i, 0], connectivity=8)
        area = stats[:, cv2.CC_STAT_AREA].copy()
        area[0] = 0
        labels[i, 0] = lab
        areas[i, 0] = area[lab]
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(areas).to(mask.device)


@pytest.fixture(scope="module")
def meta_model():
    """Meta's SAM 2.1 Hiera-tiny at random init. ``import sam2`` initialises Hydra's global state with its own
    configs (which ``build_sam2`` composes); it is cleared again so that the project's Hydra tests are unaffected."""
    import sam2  # noqa: F401
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from sam2.build_sam import build_sam2

    if not GlobalHydra.instance().is_initialized():  # sam2 imported (and cleared) earlier in this process
        initialize_config_module("sam2", version_base="1.2")
    try:
        torch.manual_seed(0)
        return build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", mode="eval")
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def meta_file(meta_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": meta_model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def scene():
    """A 360x480 RGB picture with four figure-like blobs and 6 keypoint prompts on each."""
    rng = np.random.default_rng(0)
    img = (rng.random((360, 480, 3)) * 60 + 40).astype(np.uint8)
    points = []
    for k, (cx, cy) in enumerate([(80, 180), (190, 170), (300, 200), (410, 160)]):
        color = tuple(int(c) for c in rng.integers(120, 255, 3))
        cv2.ellipse(img, (cx, cy), (35, 110), 0, 0, 360, color, -1)
        cv2.circle(img, (cx, cy - 120), 22, color, -1)
        pts = np.array([[cx, cy - 120], [cx - 20, cy - 60], [cx + 20, cy - 60], [cx, cy], [cx - 15, cy + 70],
                        [cx + 15, cy + 70]], np.float32) + k  # fmt: skip
        points.append(pts)
    return img, points


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _compare(meta_model, meta_file, scene, hole: float, sprinkle: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Mean mask IoU and largest score difference between Meta's predictor and ours, our masks, and our masks
    without post-processing."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    img, points = scene
    labels = [np.ones(len(p), np.int64) for p in points]
    predictor = SAM2ImagePredictor(meta_model, max_hole_area=hole, max_sprinkle_area=sprinkle)
    with torch.inference_mode():
        predictor.set_image(img)
        meta = [predictor.predict(point_coords=p, point_labels=lab, multimask_output=False) for p, lab in
                zip(points, labels)]  # fmt: skip
    ours = Sam2Segmenter.from_pretrained(str(meta_file), max_hole_area=hole, max_sprinkle_area=sprinkle)
    ours.set_image(img)
    masks, scores = ours.predict(points, labels)
    raw, _ = ours.predict(points, labels, max_hole_area=0, max_sprinkle_area=0)
    ious = [_iou(masks[i], m[0][0].astype(bool)) for i, m in enumerate(meta)]
    score_diff = max(abs(float(scores[i]) - float(m[1][0])) for i, m in enumerate(meta))
    return float(np.mean(ious)), score_diff, masks, raw


def test_meta_checkpoint_maps_onto_every_parameter(meta_model, meta_file):
    sd = meta_model.state_dict()
    assert infer_hiera_size(sd) == "tiny"
    model = Sam2Segmenter.from_pretrained(str(meta_file)).model  # strict: raises on any unfilled parameter
    hf = convert_meta_sam2(sd)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, hf[key], rtol=0, atol=0)


def test_same_masks_and_scores_as_meta_predictor(meta_model, meta_file, scene):
    mean_iou, score_diff, masks, _ = _compare(meta_model, meta_file, scene, 0.0, 0.0)
    assert 0.0 < masks.mean() < 0.9  # non-trivial masks: the comparison can fail
    assert mean_iou >= 0.98, mean_iou
    assert score_diff <= 1e-3, score_diff


def test_same_masks_with_bmp_postprocessing(meta_model, meta_file, scene, monkeypatch):
    import sam2.utils.misc

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", _cpu_connected_components)
    mean_iou, score_diff, masks, raw = _compare(meta_model, meta_file, scene, HOLE, SPRINKLE)
    assert mean_iou >= 0.98, mean_iou
    assert score_diff <= 1e-3, score_diff
    assert (raw != masks).any()  # the post-processing changed these masks, so the comparison covers it


@pytest.mark.slow
@pytest.mark.parametrize("size", ["s", "b+", "l"])
def test_every_meta_size_maps_and_matches(size, scene, tmp_path):
    """The other three SAM 2.1 sizes (b+ is what BMP runs): the size is read off the weights, every parameter is
    filled, and the heads / global-attention blocks / window sizes not stored in the weights are right (same masks
    and scores as Meta's predictor)."""
    import sam2  # noqa: F401
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from sam2.build_sam import build_sam2

    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    try:
        torch.manual_seed(0)
        model = build_sam2(f"configs/sam2.1/sam2.1_hiera_{size}.yaml", ckpt_path=None, device="cpu", mode="eval")
    finally:
        GlobalHydra.instance().clear()
    expected = {"s": "small", "b+": "base_plus", "l": "large"}[size]
    assert infer_hiera_size(model.state_dict()) == expected
    path = tmp_path / f"sam2.1_hiera_{expected}.pt"
    torch.save({"model": model.state_dict()}, path)
    mean_iou, score_diff, _, _ = _compare(model, path, scene, 0.0, 0.0)
    assert mean_iou >= 0.98 and score_diff <= 1e-3, (mean_iou, score_diff)
