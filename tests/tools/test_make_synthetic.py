"""``python -m bmp_lightning.tools.make_synthetic``: the synthetic dataset from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from bmp_lightning.tools.make_synthetic import main
from bmp_lightning.utils.cli import parse_key_values, parse_value

H, W = 256, 320  # the generator's default image size


def _load(path: Path):
    return json.loads(Path(path).read_text())


def test_cli(tmp_path, capsys):
    paths = main([f"out={tmp_path / 'cli'}", "n_images=3", "seed=1", "val_fraction=0.34", "image_size=128,160"])
    out = capsys.readouterr().out
    assert "person_keypoints_train.json" in out and "mpii_val.json" in out
    assert len(list(paths["images_train"].glob("*.jpg"))) == 2 and len(list(paths["images_val"].glob("*.jpg"))) == 1
    assert cv2.imread(str(next(paths["images_val"].glob("*.jpg")))).shape == (128, 160, 3)
    with pytest.raises(SystemExit, match="out=DIR"):
        main(["n_images=3"])
    with pytest.raises(SystemExit, match="bogus"):
        main([f"out={tmp_path / 'bad'}", "bogus=1"])
    paths = main([f"out={tmp_path / 'hr'}", "n_images=1", "n_val=0", "height_range=0.3,0.5", "max_people=2"])
    heights = [
        a["amodal_bbox_xyxy"][3] - a["amodal_bbox_xyxy"][1] for a in _load(paths["keypoints21_train"])["annotations"]
    ]
    assert 0 < len(heights) <= 2 and max(heights) <= 0.5 * H * 1.1


def test_parse_value_types():
    assert [parse_value(v) for v in ("true", "False", "null", "3", "0.5", "a,b", "[1,2]", "x")] == [
        True, False, None, 3, 0.5, ("a", "b"), (1, 2), "x",
    ]  # fmt: skip
    assert parse_key_values(["--n-images=3", "out=d"], typed=True) == {"n_images": 3, "out": "d"}
    assert parse_key_values(["n=3"]) == {"n": "3"}
    with pytest.raises(SystemExit, match="key=value"):
        parse_key_values(["positional"])
