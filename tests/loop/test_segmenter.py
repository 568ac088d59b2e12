"""Sam2Segmenter with a tiny random SAM 2 (no network): shapes, batching, coordinate convention, offline error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bmp_lightning.interop.hub import WeightsUnavailableError  # noqa: E402
from bmp_lightning.loop.segmenter import Sam2Segmenter, clean_mask_logits  # noqa: E402


@pytest.fixture(scope="module")
def seg() -> Sam2Segmenter:
    return Sam2Segmenter.tiny_random(seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.RandomState(0).rand(60, 70, 3) * 255).astype(np.uint8)


PTS = [np.array([[10.0, 10.0], [30.0, 20.0]]), np.array([[50.0, 40.0]])]
LABELS = [np.ones(2, np.int64), np.ones(1, np.int64)]


def test_set_image_predict_shapes(seg, image):
    seg.set_image(image)
    masks, scores = seg.predict(PTS, LABELS)
    assert masks.shape == (2, 60, 70) and masks.dtype == bool
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()  # sigmoid IoU head
    empty_m, empty_s = seg.predict([], [])
    assert empty_m.shape == (0, 60, 70) and empty_s.shape == (0,)


def test_batched_equals_one_by_one(seg, image):
    seg.set_image(image)
    masks, scores = seg.predict(PTS, LABELS)
    for i in range(2):
        m, s = seg.predict([PTS[i]], [LABELS[i]])
        np.testing.assert_array_equal(m[0], masks[i])
        assert s[0] == pytest.approx(scores[i], abs=1e-6)


def test_matches_transformers_processor_conventions(seg, image):
    """Same points through Sam2Processor's coordinate scaling and post_process_masks give the same masks."""
    from transformers import Sam2Processor
    from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor

    proc = Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": 128, "width": 128}), target_size=128)
    pts = [[PTS[0].tolist(), [[50.0, 40.0], [5.0, 5.0]]]]
    inp = proc(images=image, input_points=pts, input_labels=[[[1, 1], [1, 1]]], return_tensors="pt")
    seg.set_image(image)
    with torch.no_grad():
        out = seg.model(
            image_embeddings=seg._embeddings,
            input_points=inp["input_points"],
            input_labels=inp["input_labels"],
            multimask_output=False,
        )
    ref = proc.post_process_masks(out.pred_masks, inp["original_sizes"])[0][:, 0].numpy()
    masks, scores = seg.predict([np.array(p) for p in pts[0]], [np.ones(2)] * 2)
    np.testing.assert_array_equal(masks, ref)
    np.testing.assert_allclose(scores, out.iou_scores[0, :, 0].numpy(), atol=1e-6)


def test_embedding_computed_once_and_seed_deterministic(image):
    a, b = Sam2Segmenter.tiny_random(seed=3), Sam2Segmenter.tiny_random(seed=3)
    a.set_image(image)
    b.set_image(image)
    calls = []
    orig = a.model.get_image_embeddings
    a.model.get_image_embeddings = lambda *x, **k: calls.append(1) or orig(*x, **k)
    a.predict(PTS, LABELS)
    a.predict(PTS, LABELS)
    assert calls == []  # predict reuses the cached embedding
    np.testing.assert_array_equal(a.predict(PTS, LABELS)[0], b.predict(PTS, LABELS)[0])


def test_predict_before_set_image_raises():
    with pytest.raises(RuntimeError, match="set_image"):
        Sam2Segmenter.tiny_random(seed=1).predict(PTS, LABELS)


def test_from_pretrained_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        Sam2Segmenter.from_pretrained("facebook/sam2.1-hiera-base-plus", local_files_only=True)
    assert "sam=sam2.1-b+" in str(info.value) and "loop.segmenter=none" in str(info.value)
    assert info.value.__cause__ is None  # one message, no chained traceback
    with pytest.raises(WeightsUnavailableError) as info:  # by name: Meta's file, the repo and the command
        Sam2Segmenter.from_pretrained("sam2.1-b+")
    msg = str(info.value)
    assert "facebook/sam2.1-hiera-base-plus" in msg and "sam2.1_hiera_base_plus.pt" in msg
    assert "hf download facebook/sam2.1-hiera-base-plus sam2.1_hiera_base_plus.pt --local-dir weights" in msg


def test_clean_mask_logits_holes_and_sprinkles():
    logits = np.full((1, 20, 20), -5.0, np.float32)
    logits[0, 2:12, 2:12] = 5.0
    logits[0, 5:8, 5:8] = -5.0  # 9 px hole
    logits[0, 15:17, 15:17] = 5.0  # 4 px speck
    out = clean_mask_logits(logits, max_hole_area=10, max_sprinkle_area=5)
    assert (out[0, 5:8, 5:8] == 10.0).all()
    assert (out[0, 15:17, 15:17] == -10.0).all()
    assert (out[0, 2:5, 2:12] == 5.0).all()  # the body is untouched
    np.testing.assert_array_equal(clean_mask_logits(logits, 0, 0), logits)
    kept = clean_mask_logits(logits, max_hole_area=8, max_sprinkle_area=3)
    np.testing.assert_array_equal(kept, logits)


def test_clean_mask_logits_components_of_the_input_as_meta():
    """Meta's postprocess_masks finds holes and sprinkles on the input logits: a 16 px ring around a 9 px hole is a
    sprinkle (removed) while its hole is filled (kept), not one 25 px component."""
    logits = np.full((1, 12, 12), -5.0, np.float32)
    logits[0, 3:8, 3:8] = 5.0
    logits[0, 4:7, 4:7] = -5.0  # 5x5 square with a 3x3 hole: 16 px ring, 9 px hole
    out = clean_mask_logits(logits, max_hole_area=9, max_sprinkle_area=16)
    assert (out[0, 4:7, 4:7] == 10.0).all()  # hole filled
    assert out[0, 3, 3] == -10.0 and out[0, 7, 7] == -10.0  # ring removed


def test_chunked_upsampling_and_box_prompts(image):
    a, b = Sam2Segmenter.tiny_random(seed=2), Sam2Segmenter.tiny_random(seed=2, chunk=1)
    a.set_image(image)
    b.set_image(image)
    pts = [PTS[0], PTS[0] + 5, PTS[0] + 10]
    labs = [LABELS[0]] * 3
    np.testing.assert_array_equal(a.predict(pts, labs)[0], b.predict(pts, labs)[0])
    boxes = np.array([[5.0, 5.0, 40.0, 30.0]] * 3)
    masks, scores = a.predict(pts, labs, boxes=boxes)
    assert masks.shape == (3, 60, 70) and np.isfinite(scores).all()
    box_only, _ = a.predict([np.zeros((0, 2))], [np.zeros(0)], boxes=boxes[:1])
    assert box_only.shape == (1, 60, 70)
