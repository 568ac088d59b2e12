"""``make demo``: the BMP demo offline, on synthetic scenes, with the models of the smoke experiments.

Steps (run from the project root; every location is fixed so a second run reuses the first one's work):

1. pose model: ``logs/smoke_models/pose/checkpoints/last.ckpt``; when absent, train it with
   ``python -m bmp_lightning.train experiment=smoke hydra.run.dir=logs/smoke_models/pose``;
2. detector: ``logs/smoke_models/det/checkpoints/last.ckpt``, trained with ``experiment=rtmdet_smoke`` likewise;
3. scenes: four synthetic crowded scenes in ``logs/smoke_models/scenes/images/val``;
4. SAM 2.1 b+ when it is in the Hugging Face cache, else ``loop.segmenter=none`` (the detector's masks, with
   ``loop.max_painted_overlap=0.7`` against re-detections);
5. ``python -m bmp_lightning.demo`` on the scenes -> ``logs/demo/smoke/``.

A model whose smoke config does not exist (or whose training fails) is replaced by a tiny random one, with a
warning: the pictures then show the mechanics of the loop, not sensible people. Extra ``key=value`` arguments go to
the demo (``make demo DEMO_ARGS="device=cuda loop=bmp_v1_exact"``).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("bmp_lightning.smoke_demo")

SMOKE_DIR = Path("logs/smoke_models")
DEMO_DIR = Path("logs/demo/smoke")
MODELS = {"pose": "smoke", "det": "rtmdet_smoke"}  # run folder -> experiment config


def smoke_checkpoint(kind: str, root: Path = Path("."), train: bool = True) -> Path | None:
    """``last.ckpt`` of the smoke model ``kind`` (``pose`` / ``det``), trained first when absent and possible."""
    run_dir = root / SMOKE_DIR / kind
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    experiment = MODELS[kind]
    if not (root / "conf" / "experiment" / f"{experiment}.yaml").is_file():
        log.warning("conf/experiment/%s.yaml does not exist yet: the %s model will be a TINY RANDOM one", experiment,
                    kind)  # fmt: skip
        return None
    if not train:
        return None
    cmd = [sys.executable, "-m", "bmp_lightning.train", f"experiment={experiment}", f"hydra.run.dir={run_dir}"]
    log.info("training the %s smoke model: %s", kind, " ".join(cmd))
    done = subprocess.run(cmd, cwd=root, check=False)
    if done.returncode != 0 or not ckpt.is_file():
        log.warning("training %s failed (exit %d) or wrote no %s: the %s model will be a TINY RANDOM one",
                    experiment, done.returncode, ckpt, kind)  # fmt: skip
        return None
    return ckpt


def sam_in_cache(name: str) -> bool:
    """Whether the SAM 2.1 weights ``name`` are a local folder or in the Hugging Face cache (no network)."""
    if Path(name).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(name, "config.json")
    return isinstance(hit, str)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the models and scenes, then run the demo; returns the demo's exit status."""
    from bmp_lightning.data.synthetic import generate
    from bmp_lightning.loop.segmenter import DEFAULT_SAM2

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s %(message)s")
    extra = list(sys.argv[1:] if argv is None else argv)
    root = Path(".")
    pose = smoke_checkpoint("pose", root)
    det = smoke_checkpoint("det", root)
    scenes = root / SMOKE_DIR / "scenes"
    if not (scenes / "images" / "val").is_dir():
        generate(scenes, n_images=4, n_val=4, seed=2025)
    args = [
        f"input={scenes / 'images' / 'val'}",
        f"detector={det or 'tiny_random'}",
        f"pose={pose or 'tiny_random'}",
        "detector_opts.input_size=320",  # the smoke detector trains at 320 (the scenes are 256x320)
        f"output_dir={root / DEMO_DIR}",
        f"hydra.run.dir={root / DEMO_DIR / 'run'}",
    ]
    if sam_in_cache(DEFAULT_SAM2):
        args += [f"sam={DEFAULT_SAM2}", "sam_opts.local_files_only=true"]
    else:
        log.warning("SAM 2.1 (%s) is not in the Hugging Face cache: running with loop.segmenter=none (the "
                    "detector's masks); pass DEMO_ARGS='sam=<local folder>' to use SAM", DEFAULT_SAM2)  # fmt: skip
        # the detector's coarse masks leave rims that iteration 2 re-detects: drop those (experiments/bmp_synthetic)
        args += ["loop.segmenter=none", "loop.max_painted_overlap=0.7"]
    if pose is None or det is None:
        log.warning("tiny random model(s) in use: boxes and keypoints are meaningless, the pictures only show the "
                    "loop's steps")  # fmt: skip
    cmd = [sys.executable, "-m", "bmp_lightning.demo", *args, *extra]
    log.info("%s", " ".join(cmd))
    code = subprocess.run(cmd, cwd=root, check=False).returncode
    if code == 0:
        log.info("demo pictures, GIFs and JSON in %s", root / DEMO_DIR)
    return code


if __name__ == "__main__":
    sys.exit(main())
