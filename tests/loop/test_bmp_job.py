"""The BMP evaluation job end to end: Hydra config -> loop over a split -> per-iteration results json -> metrics.

Models are the project's own classes (tiny, random) saved as checkpoint files that the job loads; a second test
uses ground-truth oracles so that the metrics have known values (AP 1 after iteration 2, AR = recall after 1).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from bmp_lightning.data.synthetic import generate
from bmp_lightning.loop import evaluate as bmp_eval
from bmp_lightning.loop.bmp import BMP
from bmp_lightning.loop.build import build_bmp, save_tiny_random_checkpoints
from bmp_lightning.metrics.coco import KEYPOINT_METRICS, CocoKeypointEvaluator, results_to_predictions
from bmp_lightning.metrics.detection import DETECTION_METRICS, CocoDetectionEvaluator
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.masks import segmentation_to_mask

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def compose_bmp(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("bmp", overrides=overrides)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_images=3, n_val=2, seed=0)  # val: images 2 and 3, 4-6 people each
    return root


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_random_checkpoints(tmp_path_factory.mktemp("models"), seed=0)


def rescore_run(run_dir: Path, gt_file: Path, name: str, k: int, iou_types=("bbox", "segm")) -> dict[str, float]:
    """Score the written results json of iteration ``k`` again with the project evaluators."""
    res = run_dir / "results"
    kp = json.loads((res / f"iter{k}.keypoints.json").read_text())
    ev = CocoKeypointEvaluator(gt_file, dataset="coco", verbose=False)
    ev.process(results_to_predictions(kp))
    out = {f"bmp/iter{k}/{name}/{m}": v for m, v in ev.evaluate().items()}
    boxes = json.loads((res / f"iter{k}.bbox.json").read_text())
    segms = json.loads((res / f"iter{k}.segm.json").read_text()) if "segm" in iou_types else None
    by_image: dict[int, dict] = {}
    for i, b in enumerate(boxes):
        d = by_image.setdefault(b["image_id"], {"image_id": b["image_id"], "bboxes": [], "scores": [], "masks": []})
        x, y, w, h = b["bbox"]
        d["bboxes"].append([x, y, x + w, y + h])
        d["scores"].append(b["score"])
        if segms is not None:
            assert segms[i]["image_id"] == b["image_id"] and segms[i]["bbox"] == b["bbox"]
            d["masks"].append(segms[i]["segmentation"])
    det = CocoDetectionEvaluator(gt_file, iou_types=iou_types, verbose=False)
    det.process(by_image.values())
    out.update({f"bmp/iter{k}/{name}/{m}": v for m, v in det.evaluate().items()})
    return out


def test_split_group_does_not_collide_with_training_data():
    """The split is its own group (``split=``, conf/split/): the command line reaches Hydra unchanged and the BMP
    config has no ``data`` key that a training DataModule override could land in."""
    cfg = compose_bmp(["split=ochuman_val", "split.img_dir=/x", "paths.output_dir=/tmp/unused"])
    assert "data" not in cfg and cfg.split.name == "ochuman" and cfg.split.img_dir == "/x"
    assert cfg.experiment_name == "ochuman"
    with pytest.raises(Exception, match="data"):  # the training group name is not the split's
        compose_bmp(["data=ochuman_val"])


@pytest.mark.parametrize("split", ["coco_val", "ochuman_val", "ochuman_test", "crowdpose", "sample_coco", "synthetic"])
def test_every_split_config_composes(split):
    cfg = compose_bmp([f"split={split}", "paths.output_dir=/tmp/unused"])
    assert cfg.split.dataset in ("coco", "ochuman", "crowdpose") and cfg.split.ann_file.endswith(".json")
    assert cfg.loop.num_iters == 2 and cfg.loop.oks_nms_thr == 0.8


def test_job_with_tiny_checkpoints(tmp_path, synthetic_root, tiny_ckpts):
    run = tmp_path / "run"
    cfg = compose_bmp([
        "split=synthetic", f"split.root={synthetic_root}", f"detector={tiny_ckpts['detector']}",
        f"pose={tiny_ckpts['pose']}", "sam=tiny_random", "detector_opts.input_size=320", f"paths.output_dir={run}",
        "num_vis=1", "logger=csv", "optimized_metric=bmp/iter2/synthetic/AP",
    ])  # fmt: skip
    metrics = bmp_eval.run_bmp_evaluation(cfg)

    # files: per-iteration results, metrics, csv log, one picture
    for k in (1, 2):
        for kind in ("keypoints", "bbox", "segm"):
            assert (run / "results" / f"iter{k}.{kind}.json").is_file()
    assert sorted(p.name for p in (run / "vis").iterdir()) == ["000000000002.png"]
    assert read_image(run / "vis" / "000000000002.png").shape[0] > 256
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    expected = {f"bmp/time/{t}" for t in ("detector", "pose", "sam", "total")} | {"bmp/skipped_images"}
    for k in (1, 2):
        expected |= {f"bmp/iter{k}/synthetic/{m}" for m in KEYPOINT_METRICS}
        expected |= {f"bmp/iter{k}/synthetic/{t}_{m}" for t in ("bbox", "segm") for m in DETECTION_METRICS}
    assert set(metrics) == expected | {"bmp/dist/world_size", "bmp/dist/rank0/images", "bmp/dist/rank0/skipped"}
    assert metrics["bmp/dist/world_size"] == 1 and metrics["bmp/dist/rank0/images"] == 2, "one process, 2 images"
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert (
        float(next(r for r in rows if r["step"] == "2")["bmp/iter2/synthetic/AP"]) == metrics["bmp/iter2/synthetic/AP"]
    )

    # value check: the metrics are the written results json scored again by the evaluators
    gt_file = synthetic_root / "annotations" / "person_keypoints_val.json"
    for k in (1, 2):
        again = rescore_run(run, gt_file, "synthetic", k)
        assert again == pytest.approx({m: metrics[m] for m in again}, abs=1e-12)

    # the results are the loop's output: the same checkpoints run directly give the same people per iteration
    bmp = build_bmp(tiny_ckpts["detector"], tiny_ckpts["pose"], "tiny_random", "bmp_d3",
                    detector_opts={"input_size": 320})  # fmt: skip
    for k in (1, 2):
        boxes = json.loads((run / "results" / f"iter{k}.bbox.json").read_text())
        kps = json.loads((run / "results" / f"iter{k}.keypoints.json").read_text())
        for image_id in (2, 3):
            snap = bmp(read_image(synthetic_root / "images" / "val" / f"{image_id:012d}.jpg")).iterations[k - 1]
            mine = [b for b in boxes if b["image_id"] == image_id]
            assert len(mine) == len(snap.persons) > 0
            np.testing.assert_allclose([b["score"] for b in mine], [p.bbox_score for p in snap.persons], atol=1e-6)
            got = np.array([e["keypoints"] for e in kps if e["image_id"] == image_id]).reshape(-1, 17, 3)
            want = np.stack([p.keypoints17() for p in snap.persons])
            np.testing.assert_allclose(got, want, atol=1e-3)


class OracleDetector:
    """Ground-truth people of the image that are not painted black yet, at most ``limit`` per call (so iteration 1
    finds the first ``limit`` people and iteration 2, on the masked-out image, the rest)."""

    def __init__(self, gt: dict, img_dir: Path, limit: int = 3):
        self.limit = limit
        self.images = {}
        for im in gt["images"]:
            anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
            masks = np.stack([segmentation_to_mask(a["segmentation"], im["height"], im["width"]) for a in anns])
            self.images[im["id"]] = (read_image(img_dir / im["file_name"]), anns, masks.astype(bool))

    def __call__(self, image):
        lit = image.any(axis=2)
        image_id = min(self.images, key=lambda i: np.abs(self.images[i][0][lit].astype(int) - image[lit]).mean())
        _, anns, masks = self.images[image_id]
        keep = [i for i, m in enumerate(masks) if lit[m].mean() > 0.5][: self.limit]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32)  # fmt: skip
        return {"bboxes": boxes[keep], "scores": np.full(len(keep), 0.9, np.float32), "masks": masks[keep]}


class OraclePose:
    """The ground-truth keypoints (score 0.9 where labelled, else 0.1) of the annotation with the given box."""

    def __init__(self, gt: dict):
        self.boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                               for a in gt["annotations"]])  # fmt: skip
        self.kpts = np.array([a["keypoints"] for a in gt["annotations"]], np.float64).reshape(-1, 17, 3)

    def pose(self, image, bboxes, masks=None):
        idx = [int(np.abs(self.boxes - b).sum(1).argmin()) for b in np.asarray(bboxes).reshape(-1, 4)]
        k = self.kpts[idx]
        return k[..., :2], np.where(k[..., 2] > 0, 0.9, 0.1)


def test_job_metric_values_with_oracles(tmp_path, synthetic_root, monkeypatch):
    gt_file = synthetic_root / "annotations" / "person_keypoints_val.json"
    gt = json.loads(gt_file.read_text())
    oracle = BMP(
        OracleDetector(gt, synthetic_root / "images" / "val", limit=3),
        OraclePose(gt),
        None,
        loop={"segmenter": "none", "maskout": "pixels", "det_nms_iou": 1.0},
    )  # no box NMS; fmt: skip
    monkeypatch.setattr(bmp_eval, "build_loop_from_config", lambda cfg, device=None: oracle)
    run = tmp_path / "run"
    cfg = compose_bmp([
        "split=synthetic", f"split.root={synthetic_root}", f"paths.output_dir={run}", "num_vis=0", "logger=csv",
        "max_images=2",
    ])  # fmt: skip
    metrics = bmp_eval.run_bmp_evaluation(cfg)

    per_image = [sum(a["image_id"] == im["id"] for a in gt["annotations"]) for im in gt["images"]]
    total = sum(per_image)
    assert total > 6  # the limit leaves people for iteration 2
    found1 = sum(min(n, 3) for n in per_image)
    name = "bmp/iter{}/synthetic/{}"
    assert metrics[name.format(1, "AR")] == pytest.approx(found1 / total)
    assert metrics[name.format(1, "bbox_AR100")] == pytest.approx(found1 / total)
    assert metrics[name.format(1, "segm_AR100")] == pytest.approx(found1 / total)
    for m in ("AP", "AR", "bbox_AP", "segm_AP", "segm_AR100"):
        assert metrics[name.format(2, m)] == pytest.approx(1.0), m
    for k in (1, 2):
        again = rescore_run(run, gt_file, "synthetic", k)
        assert again == pytest.approx({m: metrics[m] for m in again}, abs=1e-12)
    info = json.loads((run / "results" / "info.json").read_text())
    assert info["images"] == 2 and info["iou_types"] == ["bbox", "segm"] and info["ground_truth"] == str(gt_file)


def test_max_images_writes_the_subset_ground_truth(tmp_path, synthetic_root, tiny_ckpts):
    run = tmp_path / "run"
    cfg = compose_bmp([
        "split=synthetic", f"split.root={synthetic_root}", "detector=tiny_random", "pose=tiny_random",
        f"paths.output_dir={run}", "num_vis=0", "~logger", "max_images=1",
        "loop=bmp_v1_exact", "loop.segmenter=none",
    ])  # fmt: skip
    metrics = bmp_eval.run_bmp_evaluation(cfg)
    sub = json.loads((run / "results" / "gt.json").read_text())
    assert [im["id"] for im in sub["images"]] == [2]
    assert {a["image_id"] for a in sub["annotations"]} == {2}
    for k in (1, 2):
        again = rescore_run(run, run / "results" / "gt.json", "synthetic", k)
        assert again == pytest.approx({m: metrics[m] for m in again}, abs=1e-12)
    assert json.loads((run / "results" / "info.json").read_text())["loop"]["sam_input_bgr"] is True


def test_missing_split_is_a_clear_error(tmp_path):
    cfg = compose_bmp(["split=ochuman_val", f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
                       "detector=tiny_random", "pose=tiny_random"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="ochuman_coco_format_val"):
        bmp_eval.run_bmp_evaluation(cfg)


def test_job_needs_models(tmp_path, synthetic_root):
    cfg = compose_bmp(["split=synthetic", f"split.root={synthetic_root}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="detector=<checkpoint>"):
        bmp_eval.run_bmp_evaluation(cfg)


def test_job_on_the_real_coco_samples(tmp_path, shared_dir, tiny_ckpts):
    run = tmp_path / "run"
    cfg = compose_bmp([
        "split=sample_coco", f"paths.shared_dir={shared_dir}", f"detector={tiny_ckpts['detector']}",
        f"pose={tiny_ckpts['pose']}", "sam=tiny_random", "detector_opts.input_size=320", f"paths.output_dir={run}",
        "num_vis=0", "~logger", "eval.det_score=instance", "eval.box_from_mask=true",
    ])  # fmt: skip
    metrics = bmp_eval.run_bmp_evaluation(cfg)
    gt_file = shared_dir / "data" / "coco" / "test_coco.json"
    assert json.loads((run / "results" / "info.json").read_text())["images"] == 4
    for k in (1, 2):
        again = rescore_run(run, gt_file, "coco_sample", k)
        assert again == pytest.approx({m: metrics[m] for m in again}, abs=1e-12)
        boxes = json.loads((run / "results" / f"iter{k}.bbox.json").read_text())
        kps = json.loads((run / "results" / f"iter{k}.keypoints.json").read_text())
        assert {b["image_id"] for b in boxes} == {785, 40083, 196141, 197388}
        # eval.det_score=instance: box results are ranked by the keypoint instance score
        assert sorted(b["score"] for b in boxes) == pytest.approx(sorted(e["score"] for e in kps))


def test_bmp_and_demo_share_the_model_loaders(cfg_bmp, tmp_path):
    """One ``bmp_models`` group: the job and the demo compose the same partial loaders, and the job's models are
    built through them (a ``_target_`` swapped in the config is what runs)."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_job

    bmp = cfg_bmp("detector=tiny_random", "pose=tiny_random", "sam=tiny_random", "detector_opts.input_size=256")
    demo = compose_job("demo.yaml", "detector=tiny_random", "pose=tiny_random", "sam=tiny_random",
                       "detector_opts.input_size=256", base_dir=tmp_path)  # fmt: skip
    assert OmegaConf.to_container(bmp.models, resolve=True) == OmegaConf.to_container(demo.models, resolve=True)
    assert bmp.models.detector._target_ == "bmp_lightning.loop.build.load_detector"
    loop = bmp_eval.build_loop_from_config(bmp, device="cpu")
    assert loop.detector.input_size == 256 and loop.segmenter is not None
    none = cfg_bmp("detector=tiny_random", "pose=tiny_random", "loop.segmenter=none", "sam=null")
    assert bmp_eval.build_loop_from_config(none, device="cpu").segmenter is None
