"""The synthetic crowded-scene generator: determinism, exact ground truth, the real formats and their readers."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from bmp_lightning.data.synthetic import (
    Figure,
    figure_keypoints,
    generate,
    rasterize_figure,
    render_scene,
    sample_figure,
)
from bmp_lightning.structures.keypoints import KEYPOINTS, NUM_COCO_KEYPOINTS, SOURCE_MAPPINGS, from_merged, to_merged
from bmp_lightning.structures.masks import segmentation_to_mask

K = {name: i for i, name in enumerate(KEYPOINTS)}
H, W = 256, 320


def _load(path: Path):
    return json.loads(Path(path).read_text())


def _masks_by_image(doc: dict) -> dict[int, list[tuple[dict, np.ndarray]]]:
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    out: dict[int, list] = {i: [] for i in sizes}
    for ann in doc["annotations"]:
        out[ann["image_id"]].append((ann, segmentation_to_mask(ann["segmentation"], *sizes[ann["image_id"]])))
    return out


def _mpii_box(center: list[float], scale: float) -> np.ndarray:
    # MMPose's MPII rule (``mpii_dataset.py``): square of side scale*200, centre y + 15*scale, then -1 (1-based).
    side = scale * 200.0
    cx, cy = center[0] - 1.0, center[1] + 15.0 * scale - 1.0
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("synthetic"), n_images=6, seed=3, n_val=2)


def test_layout_and_counts(dataset):
    assert len(list(dataset["images_train"].glob("*.jpg"))) == 4
    assert len(list(dataset["images_val"].glob("*.jpg"))) == 2
    for split, ids in (("train", [1, 2, 3, 4]), ("val", [5, 6])):
        docs = [_load(dataset[f"{key}_{split}"]) for key in ("coco", "instances", "aic", "keypoints21")]
        for doc in docs:
            assert [im["id"] for im in doc["images"]] == ids
            assert [im["file_name"] for im in doc["images"]] == [f"{i:012d}.jpg" for i in ids]
            assert [a["id"] for a in doc["annotations"]] == [a["id"] for a in docs[0]["annotations"]]
        n_img = {i: sum(a["image_id"] == i for a in docs[0]["annotations"]) for i in ids}
        assert all(2 <= n <= 6 for n in n_img.values()), n_img  # crowded: 2-6 people per image
        for im in docs[0]["images"]:
            img = cv2.imread(str(dataset[f"images_{split}"] / im["file_name"]))
            assert img.shape == (H, W, 3) and (im["height"], im["width"]) == (H, W)
        assert docs[0]["categories"][0]["keypoints"] == list(KEYPOINTS[:NUM_COCO_KEYPOINTS])
        assert docs[3]["categories"][0]["keypoints"] == list(KEYPOINTS)
        assert len(docs[2]["categories"][0]["keypoints"]) == 14
        assert all("area" not in a and "iscrowd" not in a for a in docs[2]["annotations"])  # like real AIC


def test_deterministic_and_seed_dependent(tmp_path):
    a = generate(tmp_path / "a", n_images=4, seed=5)
    b = generate(tmp_path / "b", n_images=4, seed=5)
    c = generate(tmp_path / "c", n_images=4, seed=6)
    files = sorted(p.relative_to(a["root"]) for p in a["root"].rglob("*") if p.is_file())
    assert len(files) == 4 + 10
    for rel in files:
        assert (a["root"] / rel).read_bytes() == (b["root"] / rel).read_bytes(), rel
    for rel in files:
        if rel.suffix == ".jpg" or "val" not in rel.name:  # val of 4 images at 0.2 is one image
            assert (a["root"] / rel).read_bytes() != (c["root"] / rel).read_bytes(), rel
    # image i depends on (seed, i) only, not on how many images are generated
    d = generate(tmp_path / "d", n_images=2, seed=5, n_val=0)
    for name in ("000000000001.jpg", "000000000002.jpg"):
        assert (d["images_train"] / name).read_bytes() == (a["images_train"] / name).read_bytes()


def test_keypoints_lie_in_their_mask_and_follow_visibility_rules(dataset):
    n_visible = n_occluded = n_outside = 0
    for split in ("train", "val"):
        kp21 = _load(dataset[f"keypoints21_{split}"])
        coco = {a["id"]: a for a in _load(dataset[f"coco_{split}"])["annotations"]}
        for people in _masks_by_image(kp21).values():
            owner = np.full((H, W), -1)
            for ann, mask in people:
                owner[mask > 0] = ann["id"]
            for ann, mask in people:
                kps = np.array(ann["keypoints"]).reshape(21, 3)
                near = cv2.dilate(mask, np.ones((5, 5), np.uint8))  # "within a couple of pixels"
                for x, y, v in kps:
                    inside = 0 <= x <= W - 1 and 0 <= y <= H - 1
                    assert (v > 0) == inside, (ann["id"], x, y, v)
                    if v == 0:
                        n_outside += 1
                        continue
                    xi, yi = int(round(x)), int(round(y))
                    if v == 2:
                        n_visible += 1
                        assert near[yi, xi], (ann["id"], x, y)
                    else:
                        n_occluded += 1
                        assert owner[yi, xi] not in (-1, ann["id"]), (ann["id"], x, y)  # someone in front
                # COCO file: the first 17, zeroed where not labelled
                ck = np.array(coco[ann["id"]]["keypoints"]).reshape(17, 3)
                lab = kps[:17, 2] > 0
                np.testing.assert_array_equal(ck[lab], kps[:17][lab])
                assert not ck[~lab].any()
                assert coco[ann["id"]]["num_keypoints"] == int(lab.sum())
    # heavy occlusion and border cuts do occur
    assert n_visible > 0 and n_occluded > 0 and n_outside > 0, (n_visible, n_occluded, n_outside)


def test_visibility_on_a_constructed_case():
    # Person a (behind) and person b (in front, 30 px to the right) in the default pose; feet below the image.
    height, width = 190, 240
    a = Figure(pelvis=(100.0, 120.0), height=160.0)
    b = Figure(pelvis=(130.0, 120.0), height=160.0)
    scene = render_scene([a, b], (height, width))
    va, vb = scene.keypoints[0, :, 2], scene.keypoints[1, :, 2]
    # hand-checked geometry: a's left shoulder (118.4, 72), elbow (~125, 97) and wrist (~135, 119) lie under b's
    # torso; a's right wrist (~65, 119) and face are clear; both people's ankles (y ~196) are below the image.
    for name in ("left_shoulder", "left_elbow", "left_wrist"):
        assert va[K[name]] == 1, name
    for name in ("right_wrist", "right_shoulder", "nose", "top_head", "right_knee"):
        assert va[K[name]] == 2, name
    for name in ("left_ankle", "right_ankle"):
        assert va[K[name]] == 0 and vb[K[name]] == 0, name
    assert (vb[[K[n] for n in KEYPOINTS if "ankle" not in n]] == 2).all()  # nobody is in front of b
    np.testing.assert_allclose(scene.keypoints[0, K["left_shoulder"], :2], [118.4, 72.0], atol=0.01)
    # visible masks: disjoint, b complete, a = its silhouette minus b
    ma, mb = scene.masks
    assert not (ma & mb).any()
    full = [np.zeros((height, width), bool) for _ in range(2)]
    for i, f in enumerate((a, b)):
        r = rasterize_figure(f)
        ys, xs = np.nonzero(r.ids)
        keep = (ys + r.y0 < height) & (xs + r.x0 < width) & (ys + r.y0 >= 0) & (xs + r.x0 >= 0)
        full[i][ys[keep] + r.y0, xs[keep] + r.x0] = True
    np.testing.assert_array_equal(mb.astype(bool), full[1])
    np.testing.assert_array_equal(ma.astype(bool), full[0] & ~full[1])
    # a person cut by the left border: its right-side joints are outside -> 0
    c = Figure(pelvis=(2.0, 100.0), height=160.0)
    vc = render_scene([c], (height, width)).keypoints[0, :, 2]
    for name in ("right_shoulder", "right_elbow", "right_wrist", "right_hip"):
        assert vc[K[name]] == 0, name
    assert vc[K["left_shoulder"]] == 2


def test_figure_conventions_and_keypoints_inside_the_silhouette():
    kp = figure_keypoints(Figure(pelvis=(0.0, 0.0), height=100.0))
    assert kp[K["left_shoulder"], 0] > kp[K["right_shoulder"], 0]  # facing the camera: person's left = image right
    assert kp[K["left_eye"], 0] > kp[K["nose"], 0] > kp[K["right_eye"], 0]
    ys = [kp[K[n], 1] for n in ("top_head", "nose", "neck", "thorax", "pelvis", "left_knee", "left_ankle")]
    assert ys == sorted(ys)
    np.testing.assert_allclose(kp[K["pelvis"]], (kp[K["left_hip"]] + kp[K["right_hip"]]) / 2, atol=1e-9)
    np.testing.assert_allclose(kp[K["thorax"]], (kp[K["left_shoulder"]] + kp[K["right_shoulder"]]) / 2, atol=1e-9)
    # top of head 0.30+0.055+0.075+0.9*0.068 h above the pelvis; ankle (0.245+0.235) h * cos(6 deg hip abduction) below
    expected = -(49.12 + 48.0 * np.cos(np.radians(6.0)))
    np.testing.assert_allclose(kp[K["top_head"], 1] - kp[K["left_ankle"], 1], expected, atol=1e-9)
    for seed in range(60):
        rng = np.random.default_rng(seed)
        fig = sample_figure(rng, (50.3, 60.7), float(rng.uniform(40, 250)))
        r = rasterize_figure(fig)
        for j, (x, y) in enumerate(figure_keypoints(fig)):
            assert r.ids[int(round(y)) - r.y0, int(round(x)) - r.x0] > 0, (seed, KEYPOINTS[j])


def test_left_and_right_limbs_have_warm_and_cool_colours():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        fig = sample_figure(rng, (100.0, 100.0), 200.0)
        fig = Figure(pelvis=fig.pelvis, height=200.0, arm_abduction=(40.0, 40.0), appearance=fig.appearance)
        r = rasterize_figure(fig)
        kp = figure_keypoints(fig)
        for side, sign in (("left", 1), ("right", -1)):
            mid = (kp[K[f"{side}_shoulder"]] + kp[K[f"{side}_elbow"]]) / 2
            red, _, blue = r.rgb[int(round(mid[1])) - r.y0, int(round(mid[0])) - r.x0].astype(int)
            assert sign * (red - blue) > 0, (seed, side, red, blue)


def test_masks_disjoint_and_consistent_across_files(dataset):
    for split in ("train", "val"):
        inst = _load(dataset[f"instances_{split}"])
        others = [_load(dataset[f"{k}_{split}"])["annotations"] for k in ("coco", "aic", "keypoints21")]
        for people in _masks_by_image(inst).values():
            stack = np.stack([m for _, m in people])
            assert stack.sum(0).max() <= 1  # visible masks never overlap
            for ann, mask in people:
                ys, xs = np.nonzero(mask)
                assert ann["area"] == float(mask.sum()) > 0
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert ann["iscrowd"] == 0 and ann["category_id"] == 1
        for anns in others:
            assert [a["segmentation"] for a in anns] == [a["segmentation"] for a in inst["annotations"]]
            assert [a["bbox"] for a in anns] == [a["bbox"] for a in inst["annotations"]]


def test_pycocotools_loads_everything_and_gt_scores_ap_1(dataset):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        for split in ("train", "val"):
            for key in ("coco", "instances", "aic", "keypoints21"):
                coco = COCO(str(dataset[f"{key}_{split}"]))
                assert len(coco.getAnnIds()) == len(_load(dataset[f"{key}_{split}"])["annotations"])
        gt = COCO(str(dataset["coco_train"]))
        res = [
            {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
            for a in gt.dataset["annotations"]
        ]
        ev = COCOeval(gt, gt.loadRes(res), "keypoints")
        ev.evaluate(), ev.accumulate(), ev.summarize()
        ap_kp = ev.stats[0]
        inst = COCO(str(dataset["instances_train"]))
        aps = {}
        for iou_type, field in (("bbox", "bbox"), ("segm", "segmentation")):
            res = [
                {
                    "image_id": a["image_id"],
                    "category_id": 1,
                    "score": 1.0,
                    field: a[field],
                }
                for a in inst.dataset["annotations"]
            ]
            ev = COCOeval(inst, inst.loadRes(res), iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            aps[iou_type] = ev.stats[0]
    assert ap_kp == pytest.approx(1.0)
    assert aps["bbox"] == pytest.approx(1.0) and aps["segm"] == pytest.approx(1.0)


def _pairs_with_mpii(kp21_doc: dict, mpii: list[dict]) -> list[tuple[dict, dict]]:
    """MPII entries follow the 21-keypoint annotations, skipping people with no labelled MPII joint."""
    mpii_slots = list(SOURCE_MAPPINGS["mpii"].values())
    anns = [a for a in kp21_doc["annotations"] if (np.array(a["keypoints"]).reshape(21, 3)[mpii_slots, 2] > 0).any()]
    assert len(anns) == len(mpii)
    return list(zip(anns, mpii))


def test_mpii_box_rule_contains_the_figure(dataset):
    for split in ("train", "val"):
        for ann, entry in _pairs_with_mpii(_load(dataset[f"keypoints21_{split}"]), _load(dataset[f"mpii_{split}"])):
            box = _mpii_box(entry["center"], entry["scale"])
            amodal = np.array(ann["amodal_bbox_xyxy"])
            assert (box[:2] <= amodal[:2] + 0.02).all() and (box[2:] >= amodal[2:] - 0.02).all()
            # tight: the square's side is the figure's longer side
            assert box[2] - box[0] == pytest.approx(max(amodal[2] - amodal[0], amodal[3] - amodal[1]), abs=0.01)
            mask = segmentation_to_mask(entry["segmentation"], H, W)
            ys, xs = np.nonzero(mask)
            assert box[0] - 0.02 <= xs.min() and xs.max() + 1 <= box[2] + 0.02 and box[1] - 0.02 <= ys.min()
            joints = np.array(entry["joints"])[np.array(entry["joints_vis"]) > 0]
            assert (joints >= box[:2]).all() and (joints <= box[2:]).all()
            assert entry["image"] == f"{ann['image_id']:012d}.jpg"


def test_aic_and_mpii_joints_are_the_21_schema_keypoints_exactly(dataset):
    for split in ("train", "val"):
        kp21 = _load(dataset[f"keypoints21_{split}"])
        by_id = {a["id"]: np.array(a["keypoints"]).reshape(21, 3) for a in kp21["annotations"]}
        for ann in _load(dataset[f"aic_{split}"])["annotations"]:
            aic = np.array(ann["keypoints"]).reshape(14, 3)
            ref = from_merged(by_id[ann["id"]], "aic")
            lab = ref[:, 2] > 0
            np.testing.assert_array_equal(aic[lab], ref[lab])
            assert not aic[~lab].any()
            merged = to_merged(aic, "aic")
            slots = [SOURCE_MAPPINGS["aic"][i] for i in range(14) if lab[i]]
            np.testing.assert_array_equal(merged[slots], by_id[ann["id"]][slots])  # AIC neck -> slot 17 (thorax)
            assert ann["num_keypoints"] == int(lab.sum())
        for ann, entry in _pairs_with_mpii(kp21, _load(dataset[f"mpii_{split}"])):
            ref = np.array(ann["keypoints"]).reshape(21, 3)
            joints, vis = np.array(entry["joints"]), np.array(entry["joints_vis"])
            for src, dst in SOURCE_MAPPINGS["mpii"].items():
                assert vis[src] == int(ref[dst, 2] > 0)
                expected = ref[dst, :2] if vis[src] else [-1.0, -1.0]
                np.testing.assert_array_equal(joints[src], expected)


def test_real_readers_parse_the_outputs(dataset):
    readers = pytest.importorskip("bmp_lightning.data.readers")
    if not all(hasattr(readers, n) for n in ("read_coco_keypoints", "read_mpii")):
        pytest.skip("bmp_lightning.data.readers lacks read_coco_keypoints / read_mpii")
    kp21 = _load(dataset["keypoints21_train"])
    by_id = {a["id"]: np.array(a["keypoints"], np.float32).reshape(21, 3) for a in kp21["annotations"]}
    img_dir = dataset["images_train"]
    for source, key in (("coco", "coco_train"), ("aic", "aic_train")):
        anns = _load(dataset[key])["annotations"]
        recs = readers.read_coco_keypoints(dataset[key], img_dir, source=source)
        assert len(recs) == sum(a["num_keypoints"] > 0 for a in anns)
        slots = list(SOURCE_MAPPINGS[source].values())
        for rec in recs:
            ref = by_id[rec.instance_id]
            lab = [s for s in slots if ref[s, 2] > 0]
            np.testing.assert_allclose(rec.keypoints[lab], ref[lab], atol=1e-4)
            assert Path(rec.image_path).is_file()
            mask = rec.mask()
            assert mask.shape == (H, W) and mask.sum() > 0
    recs = readers.read_mpii(dataset["mpii_train"], img_dir)
    pairs = _pairs_with_mpii(kp21, _load(dataset["mpii_train"]))
    assert len(recs) == len(pairs)
    for rec, (ann, _) in zip(recs, pairs):
        assert rec.image_id == ann["image_id"]
        amodal = np.array(ann["amodal_bbox_xyxy"])
        assert (rec.bbox[:2] <= amodal[:2] + 0.02).all() and (rec.bbox[2:] >= amodal[2:] - 0.02).all()
        ref = by_id[ann["id"]]
        lab = [s for s in SOURCE_MAPPINGS["mpii"].values() if ref[s, 2] > 0]
        np.testing.assert_allclose(rec.keypoints[lab, :2], ref[lab, :2], atol=1e-4)
        assert (rec.keypoints[lab, 2] == 1).all()


def test_polygon_segmentation_mode(tmp_path):
    a = generate(tmp_path / "p", n_images=2, seed=1, n_val=0, segmentation="polygon")
    b = generate(tmp_path / "r", n_images=2, seed=1, n_val=0)
    pa, rb = _load(a["instances_train"]), _load(b["instances_train"])
    assert all(isinstance(x["segmentation"], list) for x in pa["annotations"])
    ious = []
    for x, y in zip(pa["annotations"], rb["annotations"]):
        mp, mr = segmentation_to_mask(x["segmentation"], H, W), segmentation_to_mask(y["segmentation"], H, W)
        ious.append((mp & mr).sum() / (mp | mr).sum())
    assert np.mean(ious) > 0.8  # contour polygons lose about half a pixel at the border and fill holes


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_val"):
        generate(tmp_path, n_images=2, n_val=3)
    with pytest.raises(ValueError, match="segmentation"):
        generate(tmp_path, n_images=1, segmentation="mask")
