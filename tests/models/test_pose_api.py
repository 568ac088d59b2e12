"""PoseEstimator: the val pipeline end to end (crop, MaskBackground, network, flip test, DARK-UDP, back to pixels)."""

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmp_lightning.interop.pose_weights import export_pose_weights
from bmp_lightning.models.components.pose_net import vitpose_tiny
from bmp_lightning.pose import PoseEstimator


class BlobFinder(nn.Module):
    """A 1-keypoint 'network' whose heatmap is the crop's brightness resampled on the UDP grid (align_corners)."""

    num_keypoints = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.mean(1, keepdim=True)
        bright = bright - bright.amin(dim=(2, 3), keepdim=True)
        return F.interpolate(bright, size=(64, 48), mode="bilinear", align_corners=True)


def _blob_image(h, w, x, y, sigma=6.0):
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("flip_test", [False, True])
def test_blob_is_found_in_image_pixels(flip_test):
    x, y = 143.3, 97.6
    img = _blob_image(240, 320, x, y)
    est = PoseEstimator(BlobFinder(), use_mask=False, flip_test=flip_test)
    boxes = np.array([[100, 40, 190, 170], [120.5, 60.2, 170.0, 150.7]], np.float32)  # different scales and aspects
    kpts, scores = est(img, boxes)
    assert kpts.shape == (2, 1, 2) and scores.shape == (2, 1)
    np.testing.assert_allclose(kpts[:, 0], [[x, y], [x, y]], atol=0.35)


def test_mask_dims_background_only_for_maskpose():
    img = np.full((120, 100, 3), 200, np.uint8)
    mask = np.zeros((120, 100), np.uint8)
    mask[30:90, 30:70] = 1
    seen = {}

    class Spy(nn.Module):
        num_keypoints = 1

        def forward(self, x):
            seen.setdefault("x", []).append(x.clone())
            return torch.zeros(x.shape[0], 1, 64, 48)

    box = np.array([[30, 30, 70, 90]], np.float32)
    PoseEstimator(Spy(), use_mask=True, flip_test=False)(img, box, masks=[mask])
    PoseEstimator(Spy(), use_mask=False, flip_test=False)(img, box, masks=[mask])
    masked, plain = seen["x"]
    corner = (0, 0, 2, 2)  # crop corner: background (padding 1.25 reaches outside the mask)
    std, mean = 58.395, 123.675
    assert masked[corner].item() * std + mean == pytest.approx(160, abs=0.6)  # round(0.8 * 200)
    assert plain[corner].item() * std + mean == pytest.approx(200, abs=0.6)
    centre = (0, 0, 128, 96)
    assert masked[centre].item() == pytest.approx(plain[centre].item())


def test_from_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = vitpose_tiny(num_keypoints=21, img_size=(256, 192)).eval()
    cfg = {"_target_": "bmp_lightning.models.components.pose_net.vitpose_tiny", "num_keypoints": 21}
    export_pose_weights(net, tmp_path / "tiny.pth", cfg, use_mask=True)
    est = PoseEstimator.from_checkpoint(tmp_path / "tiny.pth")
    assert est.use_mask
    ref = PoseEstimator(net, use_mask=True)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (200, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 120, 180], [50, 20, 150, 190]], np.float32)
    k1, s1 = est(img, boxes)
    k2, s2 = ref(img, boxes)
    np.testing.assert_allclose(k1, k2, atol=1e-4)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    # the same weights without the stored config: architecture read off the tensor shapes
    torch.save({"state_dict": net.state_dict()}, tmp_path / "bare.pth")
    k3, _ = PoseEstimator.from_checkpoint(tmp_path / "bare.pth", use_mask=True)(img, boxes)
    np.testing.assert_allclose(k3, k2, atol=1e-4)


def test_empty_and_bad_input():
    est = PoseEstimator(BlobFinder(), use_mask=False)
    k, s = est(np.zeros((50, 50, 3), np.uint8), np.zeros((0, 4)))
    assert k.shape == (0, 1, 2) and s.shape == (0, 1)
    with pytest.raises(ValueError, match="RGB uint8"):
        est(np.zeros((50, 50), np.uint8), np.zeros((1, 4)))


def test_region_first_crops_equal_the_full_image_order_for_a_crowd():
    """16 masked people on one image: the region-first crops are bit-identical to upstream's full-image order
    (MaskBackground over the whole image, then the warp), people cut by the border and overlapping boxes included."""
    import cv2

    from bmp_lightning.data.pipeline import Compose
    from bmp_lightning.data.transforms import GetBBoxCenterScale, MaskBackground, TopdownAffine

    rng = np.random.default_rng(0)
    h, w = 360, 480
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes, masks = [], []
    for i in range(16):
        cx, cy = rng.uniform(-20, w + 20), rng.uniform(-20, h + 20)
        bw, bh = rng.uniform(20, 200), rng.uniform(40, 300)
        boxes.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        m = np.zeros((h, w), np.uint8)
        cv2.ellipse(m, (int(cx), int(cy)), (int(bw / 2), int(bh / 2)), float(rng.uniform(0, 90)), 0, 360, 1, -1)
        masks.append(m if i != 3 else np.zeros((h, w), np.uint8))  # an empty mask: the image as is
    boxes = np.array(boxes, np.float32)
    est = PoseEstimator(vitpose_tiny(num_keypoints=21, img_size=(256, 192)), use_mask=True, flip_test=False)
    crops, centers, scales = est._crops(img, boxes, masks)
    reference = Compose([GetBBoxCenterScale(1.25), MaskBackground(0.2, continue_on_failure=True), TopdownAffine()])
    for i, (box, mask) in enumerate(zip(boxes, masks, strict=True)):
        sample = {"img": img, "bbox": box, "mask": mask if mask.any() else None}
        sample.update(keypoints=np.zeros((1, 2), np.float32), keypoints_visible=np.zeros(1, np.float32))
        ref = reference(sample, np.random.default_rng(0))
        np.testing.assert_array_equal(crops[i], ref["img"], err_msg=f"person {i}")
        np.testing.assert_array_equal(centers[i], ref["bbox_center"])
        np.testing.assert_array_equal(scales[i], ref["bbox_scale"])
    assert (crops[0] != cv2.warpAffine(img, get_warp(centers[0], scales[0]), (192, 256))).any()  # masking happened


def get_warp(center, scale):
    from bmp_lightning.data.crop import get_udp_warp_matrix

    return get_udp_warp_matrix(center, scale, 0.0, (192, 256))


def test_validation_and_pose_estimator_share_flip_test_and_decode(cfg_train):
    """The configured PoseLitModule's validation path (predict_heatmaps + decode) and PoseEstimator give the same
    heatmaps and image-pixel keypoints for the same crops: one flip test and one DARK-UDP decode for both."""
    cfg = cfg_train(
        "model=vitpose_tiny", "model.net.depth=1", "model.net.deconv_channels=[16,16]", "model.num_layers=3"
    )
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, net=hydra.utils.instantiate(cfg.model.net), init_weights=None).eval()
    assert module.hparams.flip_test
    est = PoseEstimator(module.net, use_mask=False, flip_test=True)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    boxes = np.array([[40, 30, 140, 220], [150, 20, 300, 230]], np.float32)
    kpts, scores = est(img, boxes)

    crops, centers, scales = est._crops(img, boxes, None)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2)  # uint8, as the DataLoader hands them to validation_step
    hm = module.predict_heatmaps(x)
    with torch.no_grad():
        no_flip = module.predict_heatmaps(x, flip_test=False)
    assert not torch.allclose(hm, no_flip)  # the flip test does something on this net
    k_val, s_val = module.decode(hm, torch.from_numpy(centers), torch.from_numpy(scales))
    np.testing.assert_allclose(k_val.numpy(), kpts, rtol=0, atol=1e-4)
    np.testing.assert_allclose(s_val.numpy(), scores, rtol=0, atol=1e-6)
