"""The BMP evaluation job: ``python -m bmp_lightning.bmp split=<split> loop=bmp_d3 detector=<ckpt> pose=<ckpt>``.

Runs detector -> MaskPose -> SAM 2 -> mask-out for ``loop.num_iters`` iterations on every image of a COCO-format
split and scores each iteration (pose AP, box AP, mask AP). Splits: ``conf/split/`` (``split=ochuman_val`` etc.);
offline: ``split=synthetic detector=tiny_random pose=tiny_random sam=tiny_random``. Logic:
:mod:`bmp_lightning.loop.evaluate`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bmp_lightning.loop.evaluate import run_bmp_evaluation
from bmp_lightning.utils.preflight import preflight
from bmp_lightning.utils.run import metric_value, task_wrapper


@task_wrapper
def evaluate_bmp(cfg: DictConfig) -> dict[str, float]:
    preflight(cfg)  # every missing input at once, before any model or logger
    return run_bmp_evaluation(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bmp.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics = evaluate_bmp(cfg)
    # ranks other than 0 of a torchrun / srun launch return no metrics (rank 0 scores)
    return metric_value(metrics, cfg.get("optimized_metric")) if metrics else None


if __name__ == "__main__":
    main()
