"""Preflight: ``python -m bmp_lightning.doctor`` lists every missing input of a composed config at once, and
``train`` / ``eval`` / ``bmp`` stop with the same table before any logger, W&B run or DDP process exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bmp_lightning import doctor

ROOT = Path(__file__).resolve().parents[1]

# what `experiment=maskpose_b` needs and must be named in one run (the acceptance list)
MASKPOSE_B_INPUTS = (
    "vrg-prague/BBoxMaskPose",
    "ViTPose-b-multi_mmpose20.pth",
    "coco/annotations/person_keypoints_train2017.json",
    "mpii/annotations/mpii_sam_train.json",
    "aic/annotations/aic_sam_train.json",
    "ochuman/annotations/ochuman_coco_format_val_range_0.00_1.00.json",
    "ochuman/images",
    "coco/detections/rtmdet-l-ins-mask.json",
)


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a fresh offline machine: empty data folder, empty Hugging Face cache, no network."""
    (tmp_path / "data").mkdir()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        BMP_DATA_DIR=str(tmp_path / "data"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
    )
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_doctor_and_train_list_every_missing_input_in_one_run(offline_env, tmp_path: Path):
    logs = tmp_path / "logs"
    found = _run(["-m", "bmp_lightning.doctor", "experiment=maskpose_b"], offline_env, ROOT)
    assert found.returncode == 1, found.stderr
    table = found.stdout
    for item in MASKPOSE_B_INPUTS:
        assert item in table, item
    # derived files name the repository command that makes them; weights the command that downloads them
    assert "python -m bmp_lightning.tools.make_sam_masks ann=" in table and "mpii_train.json" in table
    assert "python -m bmp_lightning.tools.make_detections" in table
    assert "hf download vrg-prague/BBoxMaskPose ViTPose-b-multi_mmpose20.pth --local-dir weights" in table
    assert str(tmp_path / "data" / "mpii" / "annotations" / "mpii_sam_train.json") in table  # the expected path
    assert table.count("MISSING") >= 12

    # train with the same overrides: the same list, exit 1, no traceback, no logger output, no run dir left
    train = _run(["-m", "bmp_lightning.train", "experiment=maskpose_b", f"paths.log_dir={logs}"], offline_env, ROOT)
    assert train.returncode == 1
    for item in MASKPOSE_B_INPUTS:
        assert item in train.stderr, item
    assert "nothing was started" in train.stderr and "Traceback" not in train.stderr
    assert [p for p in logs.rglob("*") if p.is_file()] == []  # no W&B files, no CSV, no hydra files, no log
    assert not list(logs.rglob("wandb")) and not list(logs.rglob(".hydra"))


def _touch_coco(root: Path) -> None:
    for rel in ("coco/annotations/person_keypoints_train2017.json", "coco/annotations/person_keypoints_val2017.json",
                "coco/detections/rtmdet-l-ins-mask.json"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps({}))
    for rel in ("coco/train2017", "coco/val2017"):
        (root / rel).mkdir(parents=True, exist_ok=True)


def test_doctor_all_present_then_one_missing(tmp_path: Path, capsys):
    _touch_coco(tmp_path)
    args = ["data=coco", "model=vitpose_tiny", "trainer=cpu", f"paths.data_dir={tmp_path}"]
    assert doctor.main(args) == 0
    out = capsys.readouterr().out
    assert "all 5 inputs present" in out and "MISSING" not in out
    (tmp_path / "coco/detections/rtmdet-l-ins-mask.json").unlink()
    assert doctor.main(args) == 1
    out = capsys.readouterr().out
    assert "1 of 5 inputs missing" in out
    missing = [ln for ln in out.splitlines() if ln.startswith("MISSING")]
    assert len(missing) == 1 and "data.val_sets.0.bbox_file" in missing[0] and "make_detections" in missing[0]


def test_doctor_eval_and_bmp_name_the_official_weights(tmp_path: Path, capsys):
    assert (
        doctor.main(["eval", "experiment=eval_maskpose_b_official", "trainer=cpu", f"paths.data_dir={tmp_path}"]) == 1
    )
    out = capsys.readouterr().out
    assert "maskpose-b" in out and "MaskPose-b.pth" in out and "vrg-prague/BBoxMaskPose" in out
    assert "data.train_sources" not in out  # eval reads no training data
    code = doctor.main(["bmp", "split=ochuman_val", "detector=rtmdet-l-bmp", "pose=maskpose-b", "sam=sam2.1-b+",
                        f"paths.data_dir={tmp_path}"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    for item in ("rtmdet-ins-l-mask.pth", "MaskPose-b.pth", "facebook/sam2.1-hiera-base-plus",
                 "sam2.1_hiera_base_plus.pt", "ochuman_coco_format_val_range_0.00_1.00.json"):  # fmt: skip
        assert item in out, item


def test_eval_without_any_weights_is_refused(tmp_path: Path, capsys):
    """Evaluating a randomly initialised network is an explicit choice (model.allow_random_init=true)."""
    _touch_coco(tmp_path)
    base = ["eval", "data=coco", "model=vitpose_tiny", "trainer=cpu", f"paths.data_dir={tmp_path}"]
    assert doctor.main(base) == 1
    assert "ckpt_path / model.init_weights" in capsys.readouterr().out
    assert doctor.main([*base, "model.allow_random_init=true"]) == 0


def test_vitpose_b_offline_stops_on_the_missing_mae_weights(tmp_path: Path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    args = ["experiment=vitpose_b", "trainer=cpu", f"paths.data_dir={tmp_path}"]
    assert doctor.main(args) == 1
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("MISSING") and "model.init_weights" in ln)
    assert "timm/vit_base_patch16_224.mae" in row and "model.allow_random_init=true" in row
    doctor.main([*args, "model.allow_random_init=true"])
    assert "model.init_weights" not in capsys.readouterr().out  # opted in: not an input any more


def test_bmp_and_eval_jobs_stop_with_the_table(offline_env, tmp_path: Path):
    logs = tmp_path / "logs"
    bmp = _run(["-m", "bmp_lightning.bmp", "split=ochuman_val", "detector=rtmdet-l-bmp", "pose=maskpose-b",
                f"paths.log_dir={logs}"], offline_env, ROOT)  # fmt: skip
    assert bmp.returncode == 1 and "Traceback" not in bmp.stderr
    for item in ("rtmdet-ins-l-mask.pth", "MaskPose-b.pth", "sam2.1_hiera_base_plus.pt", "ochuman/images"):
        assert item in bmp.stderr, item
    ev = _run(["-m", "bmp_lightning.eval", "experiment=eval_maskpose_b_official", "trainer=cpu",
               f"paths.log_dir={logs}"], offline_env, ROOT)  # fmt: skip
    assert ev.returncode == 1 and "MaskPose-b.pth" in ev.stderr and "Traceback" not in ev.stderr
    assert [p for p in logs.rglob("*") if p.is_file()] == []
