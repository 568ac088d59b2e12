"""The BMP evaluation job under torchrun: 2 CPU processes (gloo) give the same results and metrics as one process.

``torchrun --nproc_per_node=2 -m bmp_lightning.bmp ...`` shards the split's images over the ranks (rank 0 takes
images 0, 2, ..., rank 1 images 1, 3, ...), rank 0 gathers and scores; tiny random models on synthetic data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bmp_lightning.data.synthetic import generate
from bmp_lightning.loop.build import save_tiny_random_checkpoints
from bmp_lightning.utils.distributed import DistContext, shard

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job_args(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_images=4, n_val=3, seed=0)  # 3 val images: an uneven split over 2 ranks (2 + 1)
    ckpts = save_tiny_random_checkpoints(tmp_path_factory.mktemp("models"), seed=0)
    return [
        "split=synthetic", f"split.root={root}", f"detector={ckpts['detector']}", f"pose={ckpts['pose']}",
        "sam=tiny_random", "detector_opts.input_size=320", "torch_threads=1", "num_vis=2", "logger=csv",
        "optimized_metric=bmp/iter2/synthetic/AP",
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[:6]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_shard_partitions_the_split() -> None:
    items = list(range(7))
    shares = [shard(items, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for s in shares for i in s) == items
    assert DistContext().shard(items) == items and DistContext().gather("x") == ["x"]
    with pytest.raises(ValueError, match="rank 3 outside a world of 3"):
        shard(items, 3, 3)


def test_two_processes_equal_one(job_args: list[str], tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "bmp_lightning.bmp", *job_args, f"hydra.run.dir={one}"])
    proc = _run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "bmp_lightning.bmp", *job_args, f"hydra.run.dir={two}",
    ])  # fmt: skip

    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    scores = [k for k in m1 if k.startswith("bmp/iter")]
    # random tiny models: pose AP is 0, a few random boxes hit (bbox AP50 > 0)
    assert len(scores) == 2 * (10 + 2 * 12) and m1["bmp/iter2/synthetic/bbox_AP50"] > 0.0
    assert {k: m2[k] for k in scores} == {k: m1[k] for k in scores}, "metrics.json differs from the one-process run"
    assert set(m2) == set(m1) | {"bmp/dist/rank1/images", "bmp/dist/rank1/skipped"}
    assert m2["bmp/dist/rank0/skipped"] == m2["bmp/dist/rank1/skipped"] == 0
    assert (m1["bmp/dist/world_size"], m1["bmp/dist/rank0/images"]) == (1, 3)
    assert (m2["bmp/dist/world_size"], m2["bmp/dist/rank0/images"], m2["bmp/dist/rank1/images"]) == (2, 2, 1)
    # the result files are byte-identical: rank 0 scores the gathered images in the split's order
    for k in (1, 2):
        for kind in ("keypoints", "bbox", "segm"):
            name = f"iter{k}.{kind}.json"
            assert (two / "results" / name).read_bytes() == (one / "results" / name).read_bytes(), name
    info = json.loads((two / "results" / "info.json").read_text())
    assert info["world_size"] == 2 and [(r["images"], r["skipped"]) for r in info["ranks"]] == [(2, []), (1, [])]
    # the first 2 images' pictures, one drawn by each rank, in rank 0's run dir
    assert sorted(p.name for p in (two / "vis").iterdir()) == sorted(p.name for p in (one / "vis").iterdir())
    assert len(list((two / "vis").iterdir())) == 2
    # progress bar on rank 0 only (its 2 images), none from rank 1 (1 image)
    assert "2/2" in proc.stderr and "1/1" not in proc.stderr, proc.stderr[-2000:]
