"""uint8 crops through the DataLoader, normalisation in PoseLitModule (on the device, as MMPose's data preprocessor).

The configured data module (``data=sample``) hands uint8 crops; the configured module (``model=vitpose_tiny``)
normalises them and must give exactly what it gives for crops normalised in the worker. Old checkpoints (no
mean/std keys) load unchanged.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir

from bmp_lightning.data.datasets import TopDownPoseDataset

CONF = Path(__file__).resolve().parents[2] / "conf"


def _cfg(sample_data_dir: Path, tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train.yaml",
            overrides=[
                "data=sample",
                "model=vitpose_tiny",
                f"paths.shared_dir={sample_data_dir.parent}",
                f"paths.output_dir={tmp_path}",
                "data.batch_size=4",
                "data.val_batch_size=4",
                "data.num_workers=0",
                "model.net.embed_dim=32",
                "model.net.depth=1",
                "model.net.num_heads=2",
                "model.net.deconv_channels=[16,16]",
                "model.num_layers=3",
            ],
        )


def test_uint8_batches_are_normalised_by_the_module(sample_data_dir: Path, tmp_path: Path):
    cfg = _cfg(sample_data_dir, tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["img"].dtype == torch.uint8 and batch["img"].shape == (4, 3, 256, 192)
    (vloader,) = dm.val_dataloader()
    vbatch = next(iter(vloader))
    assert vbatch["img"].dtype == torch.uint8

    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model, net=hydra.utils.instantiate(cfg.model.net), init_weights=None).eval()
    # the same samples normalised in the worker (the old path)
    ds = dm.train_dataset
    ref = TopDownPoseDataset(ds.records, ds.pipeline, normalize=True, seed=ds.seed, use_mask=ds.use_mask)
    idx = batch["idx"].tolist()
    floats = torch.stack([ref[i]["img"] for i in idx])
    torch.testing.assert_close(model.normalize(batch["img"]), floats, rtol=0, atol=1e-5)
    assert model.normalize(floats) is floats  # float input counts as normalised
    with torch.no_grad():
        loss_u8 = model.training_step(batch, 0)
        loss_f = model.training_step({**batch, "img": floats}, 0)
    torch.testing.assert_close(loss_u8, loss_f, rtol=1e-5, atol=1e-7)
    hm_u8 = model.predict_heatmaps(vbatch["img"])
    torch.testing.assert_close(hm_u8, model.predict_heatmaps(model.normalize(vbatch["img"])))


def test_old_checkpoints_load_without_mean_std_keys(sample_data_dir: Path, tmp_path: Path):
    cfg = _cfg(sample_data_dir, tmp_path)
    model = hydra.utils.instantiate(cfg.model, net=hydra.utils.instantiate(cfg.model.net), init_weights=None)
    state = model.state_dict()
    assert not any("pixel_" in k for k in state)  # non-persistent buffers: checkpoints unchanged
    fresh = hydra.utils.instantiate(cfg.model, net=hydra.utils.instantiate(cfg.model.net), init_weights=None)
    fresh.load_state_dict(state, strict=True)
    assert "pixel_mean" in dict(fresh.named_buffers())  # moves with the module to its device
