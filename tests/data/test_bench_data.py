"""`make bench-data` runs end to end (one epoch, one repeat: a smoke run, never a timed test)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def test_bench_data_prints_the_four_pipelines_profile_and_pose_crops(
    sample_data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from bmp_lightning.tools import bench

    monkeypatch.setattr(bench, "SHARED", sample_data_dir.parent)
    monkeypatch.setenv("BENCH_EPOCHS", "1")
    monkeypatch.setenv("BENCH_REPEATS", "1")
    monkeypatch.setenv("BENCH_REFERENCE", "1")
    monkeypatch.setenv("BENCH_DECODER_N", "16")
    bench.bench_data()
    out = capsys.readouterr().out
    for split, model in bench.PIPELINES:
        line = re.search(rf"{split}\s+{model}\s+([\d.]+) samples/s,\s+([\d.]+) per CPU-second.*reference order", out)
        assert line and float(line.group(1)) > 0 and float(line.group(2)) > 0, out
    assert re.search(r"JPEG decode of the box the crop reads\s+[\d.]+", out)
    assert "JPEG region decoding: on (libjpeg-turbo of Pillow" in out
    assert re.search(r"of which mask perturbation\s+[\d.]+", out)
    floor = re.search(r"Val floor .*whole decode ([\d.]+), the crop's box ([\d.]+), of which entropy decoding to the "
                      r"box's last row ([\d.]+); warp ([\d.]+) -> at most (\d+) samples/s", out)  # fmt: skip
    assert floor, out
    whole, box, entropy, warp = (float(floor.group(k)) for k in range(1, 5))
    assert 0 < entropy < box and 0 < warp, out  # the rows above the box cost less than the box's own decode
    assert re.search(r"16 masked people on one image: [\d.]+ ms region-first, [\d.]+ ms full-image", out)
    assert "batch of 16x21 heatmaps" in out
