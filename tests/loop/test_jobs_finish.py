"""Inference jobs finish: an unreadable image (truncated, empty) is skipped, counted and listed with its reason in
the job's json, and the other images are processed; ``strict=true`` stops at the first one, as before.

Through the Hydra job functions (``bmp_lightning.demo.demo``, ``bmp_lightning.bmp.evaluate_bmp``) with the tiny
random models, on synthetic scenes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bmp_lightning.bmp import evaluate_bmp
from bmp_lightning.data.synthetic import generate
from bmp_lightning.demo import demo
from bmp_lightning.structures.records import BadSampleError

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_images=3, n_val=3, seed=0)  # val: images 3, 4, 5
    return root


def test_demo_skips_unreadable_images_and_finishes(tmp_path: Path, synthetic_root: Path):
    folder = tmp_path / "pictures"
    shutil.copytree(synthetic_root / "images" / "val", folder)
    good, cut, other = sorted(folder.glob("*.jpg"))
    _truncate(cut)
    (folder / "zzz_empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    base = [f"input={folder}", "detector=tiny_random", "pose=tiny_random", "loop.segmenter=none", "gif=false",
            "detector_opts.input_size=320", f"paths.output_dir={tmp_path / 'run'}"]  # fmt: skip
    summary = demo(_compose("demo", [*base, f"output_dir={out}"]))
    assert [Path(s["image"]).name for s in summary] == [good.name, other.name]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["num_skipped"] == 2
    assert [(Path(s["image"]).name, s["reason"].split(": ")[-1]) for s in doc["skipped"]] == [
        (cut.name, "truncated JPEG (no end-of-image marker)"),
        ("zzz_empty.jpg", "empty file"),
    ]
    assert {p.name for p in out.glob("*.json")} == {f"{good.stem}.json", f"{other.stem}.json", "summary.json"}

    with pytest.raises(BadSampleError, match=rf"{cut.name}: truncated JPEG"):
        demo(_compose("demo", [*base, f"output_dir={tmp_path / 'strict'}", "strict=true"]))
    assert not (tmp_path / "strict" / "summary.json").exists()

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(cut, only_bad / cut.name)
    with pytest.raises(BadSampleError, match="none of the 1 images could be read"):
        demo(_compose("demo", [*base, f"input={only_bad}", f"output_dir={tmp_path / 'none'}"]))
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["num_skipped"] == 1


def test_bmp_job_skips_unreadable_images_and_finishes(tmp_path: Path, synthetic_root: Path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    gt = json.loads((root / "annotations" / "person_keypoints_val.json").read_text())
    first, cut, last = gt["images"]
    _truncate(root / "images" / "val" / cut["file_name"])
    run = tmp_path / "run"
    base = ["split=synthetic", f"split.root={root}", "detector=tiny_random", "pose=tiny_random", "sam=tiny_random",
            "detector_opts.input_size=320", "num_vis=0", "logger=csv"]  # fmt: skip
    metrics = evaluate_bmp(_compose("bmp", [*base, f"paths.output_dir={run}"]))
    assert metrics["bmp/skipped_images"] == 1.0
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["bmp/skipped_images"] == 1.0
    (entry,) = on_disk["bmp/skipped"]
    assert entry["image_id"] == cut["id"] and entry["file"].endswith(cut["file_name"])
    assert "truncated JPEG" in entry["reason"] and "person_keypoints_val.json, image id" in entry["reason"]
    assert json.loads((run / "results" / "info.json").read_text())["skipped"] == [entry]
    for k in (1, 2):  # the job finished: every iteration scored, only the readable images have results
        assert f"bmp/iter{k}/synthetic/AP" in metrics
        ids = {r["image_id"] for r in json.loads((run / "results" / f"iter{k}.bbox.json").read_text())}
        assert cut["id"] not in ids and ids <= {first["id"], last["id"]}
    with open(run / "csv" / "metrics.csv") as f:
        assert "bmp/skipped_images" in f.readline()

    strict = _compose("bmp", [*base, f"paths.output_dir={tmp_path / 'strict'}", "strict=true"])
    with pytest.raises(
        BadSampleError, match=rf"{cut['file_name']} \(.*person_keypoints_val.json, image id {cut['id']}\): truncated"
    ):
        evaluate_bmp(strict)
    assert not (tmp_path / "strict" / "metrics.json").exists()
