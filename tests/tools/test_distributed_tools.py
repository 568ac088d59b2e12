"""``make_detections`` and ``make_sam_masks`` under torchrun: 2 CPU processes (gloo) write the same file as one,
through per-rank sidecars merged by rank 0, and a run interrupted with one process resumes with two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bmp_lightning.data.synthetic import generate
from bmp_lightning.loop.build import load_detector, load_segmenter
from bmp_lightning.tools import make_detections as det_tool
from bmp_lightning.tools import make_sam_masks as sam_tool

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_images=6, n_val=5, seed=1)  # 5 val images: 3 + 2 over 2 ranks
    return root


def _run(module: str, args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    launch = [sys.executable, "-m"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
    ]  # fmt: skip
    proc = subprocess.run([*launch, module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


class FailAt:
    """A detector that stops the run (like a kill) on its ``n``-th call."""

    def __init__(self, detector, n: int):
        self.detector, self.n, self.calls, self.batch_size = detector, n, 0, 1

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("simulated kill")
        return self.detector(images)


def test_make_detections_two_processes_equal_one(synthetic: Path, tmp_path: Path) -> None:
    ann = synthetic / "annotations" / "person_keypoints_val.json"
    common = [f"ann={ann}", f"images={synthetic / 'images' / 'val'}", "detector=tiny_random", "batch_size=1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    # one process (in this one: what the CLI runs for detector=tiny_random batch_size=1), then torchrun with 2
    det_tool.make_detections(ann, synthetic / "images" / "val", one, load_detector("tiny_random", batch_size=1),
                             progress=False)  # fmt: skip
    proc = _run("bmp_lightning.tools.make_detections", [*common, f"out={two}"], nproc=2)
    dets = json.loads(one.read_text())
    assert len(dets) > 0 and {d["image_id"] for d in dets} <= {im["id"] for im in json.loads(ann.read_text())["images"]}
    assert json.loads(two.read_text()) == dets, "2 ranks wrote another file than 1 process"
    assert not list(tmp_path.glob("*.partial*")), "the per-rank sidecars are merged and removed"
    assert "5 images (0 done before, 5 now, 0 skipped)" in proc.stderr, proc.stderr[-2000:]

    # interrupted with one process after 2 images, finished by 2 processes: the same file again
    resumed = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        det_tool.make_detections(ann, synthetic / "images" / "val", resumed, FailAt(load_detector("tiny_random"), 3),
                                 settings={"detector": "tiny_random", "input_size": None}, progress=False)  # fmt: skip
    assert len(det_tool.partial_path(resumed).read_text().splitlines()) == 1 + 2
    proc = _run("bmp_lightning.tools.make_detections", [*common, f"out={resumed}"], nproc=2)
    assert "5 images (2 done before, 3 now, 0 skipped)" in proc.stderr, proc.stderr[-2000:]
    assert json.loads(resumed.read_text()) == dets
    assert not list(tmp_path.glob("*.partial*"))


def test_make_sam_masks_two_processes_equal_one(synthetic: Path, tmp_path: Path) -> None:
    # the synthetic MPII json carries the generator's exact masks: without them, as the real MPII json
    entries = json.loads((synthetic / "annotations" / "mpii_val.json").read_text())
    ann = tmp_path / "mpii_val.json"
    ann.write_text(
        json.dumps([{k: v for k, v in e.items() if k not in ("segmentation", "sam_score")} for e in entries])
    )
    common = [f"ann={ann}", f"images={synthetic / 'images' / 'val'}", "sam=tiny_random", "every=1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    sam_tool.make_sam_masks(ann, synthetic / "images" / "val", one, segmenter=lambda: load_segmenter("tiny_random"),
                            every=1, progress=False)  # fmt: skip
    proc = _run("bmp_lightning.tools.make_sam_masks", [*common, f"out={two}"], nproc=2)
    people = json.loads(one.read_text())
    assert len(people) == len(json.loads(ann.read_text())) and all(p["segmentation"]["counts"] for p in people)
    assert json.loads(two.read_text()) == people, "2 ranks wrote another file than 1 process"
    assert not list(tmp_path.glob("*.partial*"))
    assert f"{len(people)} segmented now (5 images)" in proc.stderr, proc.stderr[-2000:]

    # a rank's sidecar left by a killed 2-process run (its first image only) is picked up by one process
    sidecar = sam_tool.partial_path(tmp_path / "resumed.json", 1)
    first = people[0]["image"]
    done = [{"index": i, "segmentation": p["segmentation"], "sam_score": p["sam_score"]}
            for i, p in enumerate(people) if p["image"] == first]  # fmt: skip
    settings = {"ann": ann.name, "format": "mpii", "mask_format": "rle"}
    sidecar.write_text(json.dumps({"settings": settings}) + "\n" + json.dumps({"image": first, "masks": done})
                       + '\n{"image": "torn')  # fmt: skip
    stats = sam_tool.make_sam_masks(ann, synthetic / "images" / "val", tmp_path / "resumed.json",
                                    segmenter=lambda: load_segmenter("tiny_random"), progress=False)  # fmt: skip
    assert (stats["done_before"], stats["new"], stats["images"]) == (len(done), len(people) - len(done), 4)
    assert json.loads((tmp_path / "resumed.json").read_text()) == people
    assert not sidecar.exists()
