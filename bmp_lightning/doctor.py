"""Every input a run needs, at once: ``python -m bmp_lightning.doctor [train|eval|bmp|demo] [--fetch] <overrides>``.

Composes the same config as ``python -m bmp_lightning.<task> <overrides>`` (default task: train) and prints one
table: each weights file, annotation file, image folder, derived file (BMP's ``*_sam_*`` MPII / AIC json, the
COCO-val detections), optional extra and GPU request, whether it is there, where it is expected and where it comes
from (hub repository + file, dataset site, or the repository command that makes it). Exit status 1 when anything
is missing. Weights named by the hub are looked up in the local Hugging Face cache; ``--fetch`` downloads them
(what ``train`` / ``eval`` / ``bmp`` do in their own preflight). Logic: :mod:`bmp_lightning.utils.preflight`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from bmp_lightning.utils.preflight import collect_requirements, format_table

TASKS = ("train", "eval", "bmp", "demo")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(task: str, overrides: Sequence[str]) -> DictConfig:
    """The config ``python -m bmp_lightning.<task> <overrides>`` runs with (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    overrides = list(overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=task):
        return compose(config_name=f"{task}.yaml", overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:

    args = list(sys.argv[1:] if argv is None else argv)
    task = args.pop(0) if args and args[0] in TASKS else "train"
    fetch = "--fetch" in args
    args = [a for a in args if a != "--fetch"]
    cfg = compose_config(task, args)
    reqs = collect_requirements(cfg, fetch=fetch)
    missing = [r for r in reqs if not r.found]
    head = f"python -m bmp_lightning.{task} {' '.join(args)}".rstrip()
    verdict = f"{len(missing)} of {len(reqs)} inputs missing" if missing else f"all {len(reqs)} inputs present"
    print(format_table(reqs, title=f"{head}: {verdict}"))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
