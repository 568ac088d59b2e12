"""BMP on pictures: ``python -m bmp_lightning.demo input=<image|folder> detector=<ckpt> pose=<ckpt> [sam=...]``.

Writes per-iteration overlays (masks, skeletons, boxes, SAM prompts), a GIF of the iterations and the instances as
JSON into ``output_dir`` (default: the run dir). Offline: ``detector=tiny_random pose=tiny_random sam=tiny_random``
or ``make demo`` (synthetic scenes, smoke-trained models). Logic: :mod:`bmp_lightning.loop.inference`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bmp_lightning.loop.inference import run_demo
from bmp_lightning.utils.run import task_wrapper


@task_wrapper
def demo(cfg: DictConfig) -> list[dict]:
    return run_demo(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo.yaml")
def main(cfg: DictConfig) -> None:
    demo(cfg)


if __name__ == "__main__":
    main()
