"""The demo: pictures per iteration, a GIF and JSON that holds exactly the loop's people."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from bmp_lightning.data.synthetic import generate
from bmp_lightning.loop.build import build_bmp, save_tiny_random_checkpoints
from bmp_lightning.loop.inference import list_images, run_demo
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.masks import segmentation_to_mask

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate(root, n_images=2, n_val=2, seed=3)
    return root / "images" / "val"


def compose_demo(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("demo", overrides=overrides)


def test_demo_writes_pictures_gif_and_the_loops_people(tmp_path, scenes):
    ckpt = save_tiny_random_checkpoints(tmp_path / "models", seed=1)
    out = tmp_path / "out"
    image = sorted(scenes.glob("*.jpg"))[0]
    cfg = compose_demo([
        f"input={image}", f"detector={ckpt['detector']}", f"pose={ckpt['pose']}", "sam=tiny_random",
        "detector_opts.input_size=320", f"output_dir={out}", "gif_ms=500",
    ])  # fmt: skip
    summary = run_demo(cfg)
    stem = image.stem
    names = {p.name for p in out.iterdir()}
    assert {f"{stem}_iter1.png", f"{stem}_iter2.png", f"{stem}_steps.png", f"{stem}.gif", f"{stem}.json"} <= names
    assert read_image(out / f"{stem}_iter1.png").shape == (256 + 16, 320, 3)  # title bar on top
    with Image.open(out / f"{stem}.gif") as gif:
        assert gif.n_frames == 2 and gif.info["duration"] == 500

    doc = json.loads((out / f"{stem}.json").read_text())
    result = build_bmp(ckpt["detector"], ckpt["pose"], "tiny_random", "bmp_d3", detector_opts={"input_size": 320})(
        read_image(image)
    )
    assert summary[0]["people"] == len(doc["persons"]) == len(result.persons) > 0
    assert (doc["height"], doc["width"]) == (256, 320) and len(doc["keypoint_names"]) == 21
    assert [it["people"] for it in doc["iterations"]] == [len(s.persons) for s in result.iterations]
    for got, p in zip(doc["persons"], result.persons):
        np.testing.assert_allclose(got["bbox"], p.bbox, atol=1e-4)
        kp = np.array(got["keypoints"])
        assert kp.shape == (21, 3)
        np.testing.assert_allclose(kp[:, :2], p.keypoints, atol=1e-3)
        np.testing.assert_allclose(kp[:, 2], p.keypoint_scores, atol=1e-3)
        assert got["iteration"] == p.iteration and got["score"] == pytest.approx(p.score, abs=1e-6)
        assert got["sam_score"] == pytest.approx(p.sam_score, abs=1e-6)
        np.testing.assert_allclose(np.array(got["prompts"]).reshape(-1, 3), p.prompts, atol=1e-3)
        mask = segmentation_to_mask(got["mask"], 256, 320).astype(bool)
        np.testing.assert_array_equal(mask, p.mask)
        assert got["mask_area"] == int(p.mask.sum())


def test_demo_on_a_folder_without_sam_or_gif(tmp_path, scenes):
    out = tmp_path / "out"
    cfg = compose_demo([
        f"input={scenes}", "detector=tiny_random", "pose=tiny_random", "loop.segmenter=none", "gif=false",
        f"output_dir={out}", "loop=bmp_v1_exact", "loop.segmenter=none",
    ])  # fmt: skip
    summary = run_demo(cfg)
    assert len(summary) == 2
    assert len(list(out.glob("*.json"))) == 3  # two images + summary.json
    assert not list(out.glob("*.gif"))
    assert json.loads((out / "summary.json").read_text())["loop"]["sam_input_bgr"] is True


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_images(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(ValueError, match="input="):
        list_images(None)


def test_render_edge_cases():
    from bmp_lightning.loop.bmp import BMPResult, IterationSnapshot
    from bmp_lightning.loop.render import draw_prompts, iteration_figure, iteration_frames

    img = np.full((40, 60, 3), 100, np.uint8)
    np.testing.assert_array_equal(draw_prompts(img, np.zeros((0, 3)), (255, 0, 0)), img)  # a person without prompts
    drawn = draw_prompts(img, np.array([[20.0, 10.0, 0.9]]), (255, 0, 0))
    assert tuple(drawn[10, 20]) == (255, 0, 0) and tuple(drawn[10, 30]) == (100, 100, 100)
    assert drawn[10, 24].min() > 150  # the dot's light ring
    empty = np.zeros(0, np.int64)
    snap = IterationSnapshot(1, np.zeros((0, 4)), np.zeros(0), empty, empty, [], {}, skipped="no detections")
    result = BMPResult(persons=[], iterations=[snap], image_size=(40, 60))
    assert iteration_figure(img, result).shape == (56, 124, 3)  # [detector input | people], 16 px title bars
    (frame,) = iteration_frames(img, result)
    np.testing.assert_array_equal(frame[16:], img)


def test_make_demo_model_lookup(tmp_path, caplog):
    from bmp_lightning.tools.smoke_demo import SMOKE_DIR, SmokeModelError, smoke_checkpoint

    # no smoke config in this root: an error, no silent tiny random model, no training started
    with pytest.raises(SmokeModelError, match=r"rtmdet_smoke.yaml does not exist.*allow_tiny_random=true"):
        smoke_checkpoint("det", root=tmp_path)
    assert smoke_checkpoint("det", root=tmp_path, allow_tiny_random=True) is None  # the explicit opt-in
    assert "TINY RANDOM" in caplog.text
    ckpt = tmp_path / SMOKE_DIR / "pose" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert smoke_checkpoint("pose", root=tmp_path) == ckpt  # an existing checkpoint is reused as is


def test_make_demo_runs_without_sam_by_its_own_config(tmp_path, monkeypatch):
    """`make demo` keeps the detector's masks because its loop preset says so, not because SAM is not cached."""
    from hydra import compose, initialize_config_dir

    from bmp_lightning.doctor import CONF_DIR
    from bmp_lightning.tools import smoke_demo

    calls = []
    monkeypatch.chdir(tmp_path)
    for kind in ("pose", "det"):
        ckpt = tmp_path / smoke_demo.SMOKE_DIR / kind / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    (tmp_path / smoke_demo.SMOKE_DIR / "scenes" / "images" / "val").mkdir(parents=True)
    monkeypatch.setattr(smoke_demo.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or _Done())
    assert smoke_demo.main([]) == 0
    assert "loop=detector_masks" in calls[-1]
    smoke_demo.main(["loop=bmp_d3", "sam=sam2.1-b+"])
    assert "loop=detector_masks" not in calls[-1] and "sam=sam2.1-b+" in calls[-1]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("demo.yaml", overrides=["loop=detector_masks"])
    assert cfg.loop.segmenter == "none" and cfg.loop.max_painted_overlap == 0.7 and cfg.loop.num_iters == 2


class _Done:
    returncode = 0
