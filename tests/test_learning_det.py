"""Learning: RTMDet-Ins-tiny trained on synthetic crowds (CPU) detects and segments held-out people.

The detector smoke experiment (``experiment=rtmdet_smoke``: RemoveRandomInstances, stage switch, AdamW + warm-up +
cosine, EMA) at a 256x256 input instead of 320, through the training entry point: 30 epochs x 16 steps at batch 4 on
64 generated scenes; scored on 16 held-out scenes. The same network untrained is the baseline (``score_thr=0`` so it
does output its 100 boxes per image). Measured (one thread, ~3 min): see experiments/rtmdet_l_maskout/README.md.
"""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_detector_learns_synthetic_crowds(tmp_path: Path, cfg_train) -> None:
    import hydra
    import lightning as L
    import numpy as np
    import torch

    from bmp_lightning.detector import Detector
    from bmp_lightning.metrics.detection import CocoDetectionEvaluator
    from bmp_lightning.structures.io import read_image
    from bmp_lightning.train import train

    out = tmp_path / "run"
    cfg = cfg_train(
        "experiment=rtmdet_smoke",
        "logger=csv",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "data.input_size=256",
        "data.train_scale=256",
        "data.stage2_scale=256",
        "data.num_workers=0",
        "data.pin_memory=false",
        "callbacks.rich_progress_bar=null",
        "callbacks.lr_monitor=null",
        out_dir=out,
    )
    torch.set_num_threads(1)  # one core, no spinning OpenMP threads when the machine is shared (as torch_threads=1)
    start = time.perf_counter()
    metrics, objs = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    trainer, dm = objs["trainer"], objs["datamodule"]
    assert trainer.global_step == 30 * 16

    # the untrained network (same seed, same init) on the same held-out images
    L.seed_everything(cfg.seed)
    untrained = hydra.utils.instantiate(cfg.model)
    untrained.hparams.score_thr = 0.0
    baseline = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    random_metrics = baseline.validate(untrained, dm, verbose=False)[0]

    names = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")
    trained = {k: float(metrics[f"val/synthetic/{k}"]) for k in names}
    rand = {k: float(random_metrics[f"val/synthetic/{k}"]) for k in names}
    print(f"\nRTMDet-Ins-tiny, 480 steps x 4 images at 256 ({minutes:.1f} min): trained {trained}, untrained {rand}")
    assert rand["bbox_AP"] < 0.01 and rand["segm_AP"] < 0.01
    # measured: bbox AP ~0.45, segm AP ~0.23 (0.000 / 0.000 untrained)
    assert trained["bbox_AP"] > 0.25 and trained["bbox_AP50"] > 0.6
    assert trained["segm_AP"] > 0.1 and trained["segm_AP50"] > 0.35

    # the deployable checkpoint (EMA weights) through the inference API gives the same scores on the raw images
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == int(ckpt["state_dict"]["ema_model.steps"]) == 30 * 16  # the final (EMA) weights
    det = Detector.from_checkpoint(last, input_size=256)
    evaluator = CocoDetectionEvaluator(dm.val_ann, ("bbox", "segm"), category_ids=dm.cat_ids, verbose=False)
    images = json.loads(Path(dm.val_ann).read_text())["images"]
    files = {Path(f).name: f for f in glob.glob(str(Path(dm.val_img_dir) / "*"))}
    for im in images:
        res = det(read_image(files[im["file_name"]]))[0]
        evaluator.process([{"image_id": im["id"], **res}])
    api = evaluator.evaluate()
    assert np.isclose(api["bbox_AP"], trained["bbox_AP"], atol=0.02), (api["bbox_AP"], trained["bbox_AP"])
    assert np.isclose(api["segm_AP"], trained["segm_AP"], atol=0.02), (api["segm_AP"], trained["segm_AP"])
