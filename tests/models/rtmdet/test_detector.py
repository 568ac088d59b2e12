"""Detector end to end: preprocessing by hand, a tiny model with known box/mask geometry, checkpoint formats."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bmp_lightning.detector import MEAN_BGR, STD_BGR, Detector, resize_pad
from bmp_lightning.interop.mmdet import rtmdet_state_dict, to_mmdet
from bmp_lightning.models.components.rtmdet.rtmdet_ins import RTMDetIns, rtmdet_ins_tiny
from bmp_lightning.structures.io import read_image

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


BOX_HALF = 1.5  # box half-size in strides (rtm_reg bias)
# Mask kernel: logit = c - |rel_x| - |rel_y| with rel = (prior - pixel) / (8 * stride): a diamond of radius
# 8 * c * stride around the prior, i.e. inscribed in the box when c = BOX_HALF / 8.
DIAMOND_C = BOX_HALF / 8


def _diamond_kernel(c: float) -> torch.Tensor:
    w0 = torch.zeros(8, 10)
    w0[0, 0], w0[1, 0], w0[2, 1], w0[3, 1] = 1, -1, 1, -1
    w1 = torch.zeros(8, 8)
    w1[:4, :4] = torch.eye(4)
    w2 = torch.zeros(1, 8)
    w2[0, :4] = -1
    return torch.cat([w0.flatten(), w1.flatten(), w2.flatten(), torch.zeros(16), torch.tensor([c])])


def _geometry_model(num_classes: int = 1, seed: int = 0) -> RTMDetIns:
    """Tiny model: random backbone/neck/cls (varied scores), boxes centred on their prior, diamond masks."""
    model = rtmdet_ins_tiny(num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            else:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(t.shape, generator=g))
        for reg, ker in zip(model.head.rtm_reg, model.head.rtm_kernel):
            reg.weight.zero_()
            reg.bias.fill_(BOX_HALF)
            ker.weight.zero_()
            ker.bias.copy_(_diamond_kernel(DIAMOND_C))
    return model.eval()


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector(_geometry_model(), score_thr=0.05, max_per_img=100)


@pytest.fixture(scope="module")
def coco_images(sample_data_dir: Path) -> list[np.ndarray]:
    return [read_image(p) for p in sorted((sample_data_dir / "coco").glob("*.jpg"))[:2]]


def test_resize_pad_by_hand():
    img = np.random.default_rng(0).integers(0, 255, (320, 480, 3), dtype=np.uint8)
    canvas, scale = resize_pad(img, 640)
    # f = 640 / 480; new size int(480 f + 0.5) = 640, int(320 f + 0.5) = int(427.17) = 427.
    assert canvas.shape == (640, 640, 3) and scale == (640 / 480, 427 / 320)
    assert np.array_equal(canvas[:427], cv2.resize(img, (640, 427), interpolation=cv2.INTER_LINEAR))
    assert (canvas[427:] == 114).all()
    tall, scale = resize_pad(np.zeros((1000, 10, 3), np.uint8), 640)
    assert scale == (6 / 10, 640 / 1000) and (tall[:, 6:] == 114).all() and (tall[:, :6] == 0).all()


def test_preprocess_bgr_normalisation(detector: Detector):
    img = np.zeros((64, 32, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 50  # R, G, B
    x, scales = detector.preprocess([img])
    assert x.shape == (1, 3, 640, 640) and scales == [(10.0, 10.0)]
    bgr = (np.array([50, 100, 200]) - np.array(MEAN_BGR)) / np.array(STD_BGR)
    pad = (114 - np.array(MEAN_BGR)) / np.array(STD_BGR)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), bgr, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 0, -1].numpy(), pad, rtol=1e-6)  # right of the 320-px wide image


def test_detector_on_real_images(detector: Detector, coco_images: list[np.ndarray]):
    results = detector(coco_images)
    assert len(results) == len(coco_images)
    for img, res in zip(coco_images, results):
        h, w = img.shape[:2]
        n = len(res["scores"])
        assert 0 < n <= 100
        assert res["bboxes"].shape == (n, 4) and res["bboxes"].dtype == np.float32
        assert res["labels"].dtype == np.int64 and (res["labels"] == 0).all()
        assert res["masks"].shape == (n, h, w) and res["masks"].dtype == bool
        assert (np.diff(res["scores"]) <= 0).all() and (res["scores"] > 0.05).all() and (res["scores"] <= 1).all()
        b = res["bboxes"]
        f = 640 / max(h, w)
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b[:, [0, 2]] <= 640 / f + 1e-3).all() and (b[:, [1, 3]] <= 640 / f + 1e-3).all()
        # Unclipped boxes are 2 * 1.5 strides wide (in original pixels) and carry the inscribed diamond mask,
        # shifted right/down by 3.5 input pixels: upstream's x8 bilinear upsampling (align_corners=False) puts
        # mask cell j at 8j + 3.5 while the priors sit at 8j (offset 0). Reproduced as is.
        shift = 3.5 / f
        checked = 0
        for box, mask in zip(b, res["masks"]):
            side = box[2] - box[0]
            if not (box[0] > 1 and box[1] > 1 and box[2] < w - 1 - shift and box[3] < h - 1 - shift):
                continue
            assert any(abs(side - 2 * BOX_HALF * s / f) < 1e-3 for s in (8, 16, 32))
            ys, xs = np.nonzero(mask)
            cx, cy = (box[0] + box[2]) / 2 + shift, (box[1] + box[3]) / 2 + shift
            assert abs(xs.mean() - cx) < 1.0 and abs(ys.mean() - cy) < 1.0
            assert xs.min() >= box[0] + shift - 1.5 and xs.max() <= box[2] + shift + 1.5
            assert ys.min() >= box[1] + shift - 1.5 and ys.max() <= box[3] + shift + 1.5
            assert 0.4 < mask.sum() / (side * side) < 0.6  # diamond = half the square
            checked += 1
        assert checked > 0


def test_detector_inputs_and_batching(detector: Detector, coco_images: list[np.ndarray], sample_data_dir: Path):
    path = sorted((sample_data_dir / "coco").glob("*.jpg"))[0]
    small = Detector(detector.model, input_size=320, batch_size=2)
    from_path, from_array = small(path)[0], small(coco_images[0])[0]
    for key in ("bboxes", "scores", "labels", "masks"):
        np.testing.assert_array_equal(from_path[key], from_array[key])
    # A batch is the stack of the single-image inputs, and the network treats its images independently.
    # (Comparing final detections instead would be brittle: a random network gives many tied scores.)
    x, scales = small.preprocess(coco_images)
    for i, img in enumerate(coco_images):
        xi, si = small.preprocess([img])
        assert torch.equal(x[i : i + 1], xi) and scales[i] == si[0]
    with torch.no_grad():
        out = small.model(x)
        single = small.model(x[1:])
    for key in ("cls_scores", "bbox_preds", "kernel_preds"):
        for a, b in zip(out[key], single[key]):
            torch.testing.assert_close(a[1:], b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["mask_feat"][1:], single["mask_feat"], atol=1e-4, rtol=1e-4)


def test_detector_square_image_equals_predict(detector: Detector):
    """An image of the input size needs no resize: results equal ``RTMDetIns.predict`` on the normalised input."""
    small = Detector(detector.model, input_size=320, max_per_img=30)
    img = np.random.default_rng(1).integers(0, 255, (320, 320, 3), dtype=np.uint8)
    res = small(img)[0]
    x, scales = small.preprocess([img])
    assert scales == [(1.0, 1.0)]
    ref = small.model.predict(x, max_per_img=30)[0]
    np.testing.assert_array_equal(res["bboxes"], ref["bboxes"].numpy())
    np.testing.assert_array_equal(res["masks"], ref["masks"].numpy())


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_from_checkpoint_formats(tmp_path: Path):
    model = _geometry_model(seed=3)
    ours = model.state_dict()
    img = np.random.default_rng(2).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    expected = Detector(model, max_per_img=10, input_size=256)(img)[0]

    torch.save(ours, tmp_path / "ours.pt")
    stale = {k: torch.zeros_like(v) for k, v in ours.items()}
    lightning = {
        "state_dict": {**{"model." + k: v for k, v in stale.items()}, **{"ema_model." + k: v for k, v in ours.items()}},
        "epoch": 3,
        "global_step": 10,
        "pytorch-lightning_version": "2.5.0",
        "hyper_parameters": {"lr": 0.004},
    }
    torch.save(lightning, tmp_path / "run.ckpt")
    mm = {"state_dict": to_mmdet(ours), "meta": {"epoch": 1}, "message_hub": {"iter": 3}, "optimizer": {}}
    torch.save(mm, tmp_path / "mmdet.pth")
    for name in ("ours.pt", "run.ckpt", "mmdet.pth"):
        det = Detector.from_checkpoint(tmp_path / name, max_per_img=10, input_size=256)
        assert det.model.num_classes == 1 and _equal_weights(det.model, model), name
        got = det(img)[0]
        np.testing.assert_array_equal(got["bboxes"], expected["bboxes"])
        np.testing.assert_array_equal(got["masks"], expected["masks"])
    # Lightning checkpoint without EMA: the "model." weights.
    assert rtmdet_state_dict({"state_dict": {"model." + k: v for k, v in ours.items()}}).keys() == ours.keys()
    with pytest.raises(ValueError, match="cannot provide"):
        Detector.from_checkpoint(tmp_path / "ours.pt", num_classes=3)


def test_from_checkpoint_coco_head_to_person(tmp_path: Path):
    coco = _geometry_model(num_classes=80)
    torch.save({"state_dict": to_mmdet(coco.state_dict())}, tmp_path / "coco.pth")
    det = Detector.from_checkpoint(tmp_path / "coco.pth", num_classes=1)
    assert det.model.num_classes == 1
    torch.testing.assert_close(det.model.head.rtm_cls[0].weight, coco.head.rtm_cls[0].weight[:1])
