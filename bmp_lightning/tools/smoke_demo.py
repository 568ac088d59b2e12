"""``make demo``: the BMP demo offline, on synthetic scenes, with the models of the smoke experiments.

Steps (run from the project root; every location is fixed so a second run reuses the first one's work):

1. pose model: ``logs/smoke_models/pose/checkpoints/last.ckpt``; when absent, train it with
   ``python -m bmp_lightning.train experiment=smoke hydra.run.dir=logs/smoke_models/pose``;
2. detector: ``logs/smoke_models/det/checkpoints/last.ckpt``, trained with ``experiment=rtmdet_smoke`` likewise;
3. scenes: four synthetic crowded scenes in ``logs/smoke_models/scenes/images/val``;
4. ``loop=detector_masks`` (``conf/loop/detector_masks.yaml``: the D3 loop keeping the detector's masks, no SAM),
   chosen here explicitly so that the demo runs offline; ``make demo DEMO_ARGS="loop=bmp_d3 sam=sam2.1-b+"`` runs
   SAM 2.1 instead (its weights by name, from the Hugging Face cache or the hub);
5. ``python -m bmp_lightning.demo`` on the scenes -> ``logs/demo/smoke/``.

A smoke model that cannot be trained stops the demo with an error; ``allow_tiny_random=true`` (an argument of
this script) replaces it by a tiny random network on purpose (the pictures then show only the loop's mechanics).
Other ``key=value`` arguments go to the demo (``make demo DEMO_ARGS="device=cuda loop=bmp_v1_exact"``).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bmp_lightning.data.synthetic import generate

log = logging.getLogger("bmp_lightning.smoke_demo")

SMOKE_DIR = Path("logs/smoke_models")
DEMO_DIR = Path("logs/demo/smoke")
MODELS = {"pose": "smoke", "det": "rtmdet_smoke"}  # run folder -> experiment config


class SmokeModelError(RuntimeError):
    """A smoke model is absent and cannot be trained (and tiny random models were not allowed)."""


def smoke_checkpoint(
    kind: str, root: Path = Path("."), train: bool = True, allow_tiny_random: bool = False
) -> Path | None:
    """``last.ckpt`` of the smoke model ``kind`` (``pose`` / ``det``), trained first when absent.

    Returns None (the caller then uses a tiny random model) only with ``allow_tiny_random``; otherwise a model that
    cannot be had raises :class:`SmokeModelError` naming the reason.
    """
    run_dir = root / SMOKE_DIR / kind
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    experiment = MODELS[kind]
    reason = None
    if not (root / "conf" / "experiment" / f"{experiment}.yaml").is_file():
        reason = f"conf/experiment/{experiment}.yaml does not exist"
    elif not train:
        reason = f"{ckpt} does not exist (training disabled)"
    else:
        cmd = [sys.executable, "-m", "bmp_lightning.train", f"experiment={experiment}", f"hydra.run.dir={run_dir}"]
        log.info("training the %s smoke model: %s", kind, " ".join(cmd))
        done = subprocess.run(cmd, cwd=root, check=False)
        if done.returncode == 0 and ckpt.is_file():
            return ckpt
        reason = f"training {experiment} failed (exit {done.returncode}) or wrote no {ckpt}"
    if not allow_tiny_random:
        raise SmokeModelError(f"no {kind} smoke model: {reason}; allow_tiny_random=true uses a tiny random one")
    log.warning("%s: the %s model is a TINY RANDOM one (allow_tiny_random=true)", reason, kind)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the models and scenes, then run the demo; returns the demo's exit status."""

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s %(message)s")
    extra = list(sys.argv[1:] if argv is None else argv)
    allow_tiny = any(a.lower() in ("allow_tiny_random=true", "allow_tiny_random=1") for a in extra)
    extra = [a for a in extra if not a.startswith("allow_tiny_random=")]
    root = Path(".")
    try:
        pose = smoke_checkpoint("pose", root, allow_tiny_random=allow_tiny)
        det = smoke_checkpoint("det", root, allow_tiny_random=allow_tiny)
    except SmokeModelError as err:
        log.error("%s", err)
        return 1
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
    if not any(a.startswith("loop=") for a in extra):
        args.append("loop=detector_masks")  # no SAM, by choice (conf/loop/detector_masks.yaml)
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
