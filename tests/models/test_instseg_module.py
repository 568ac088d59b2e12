"""InstSegLitModule: EMA math, optimiser groups, lr schedule, a few steps, validation metrics, checkpoints, init."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from bmp_lightning.data.instseg_datamodule import InstSegDataModule
from bmp_lightning.interop.mmdet import to_mmdet
from bmp_lightning.models.components.rtmdet.rtmdet_ins import rtmdet_ins_tiny
from bmp_lightning.models.ema import ExpMomentumEMA, ema_momentum
from bmp_lightning.models.instseg_module import InstSegLitModule, load_init_weights, rtmdet_param_groups
from bmp_lightning.models.optim import rtmdet_lr_factor
from bmp_lightning.utils.val_interval import ValIntervalSwitch

SIZE = 128  # network input of the synthetic tests (the scenes are 128x160)


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bmp_lightning.data.synthetic import generate

    root = tmp_path_factory.mktemp("instseg_syn")
    generate(root, n_images=3, n_val=1, seed=3, image_size=(SIZE, 160), min_visible_px=40)
    return root


def _datamodule(root: Path, **kw) -> InstSegDataModule:
    args = dict(
        train_ann="annotations/instances_train.json",
        train_img_dir="images/train",
        val_ann="annotations/instances_val.json",
        val_img_dir="images/val",
        root=str(root),
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        input_size=SIZE,
        train_scale=SIZE,
        stage2_scale=SIZE,
        ratio_range=(0.8, 1.2),
        remove_prob=0.0,
    )
    args.update(kw)
    return InstSegDataModule(**args)


# ------------------------------------------------------------------------------------------------ EMA
class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 1)
        self.bn = nn.BatchNorm1d(1)
        self.alias = self.fc  # the same tensors under two names, like RTMDet's shared head convs


def _fill(m: _Toy, value: float) -> None:
    with torch.no_grad():
        for t in (m.fc.weight, m.fc.bias, m.bn.weight, m.bn.bias, m.bn.running_mean, m.bn.running_var):
            t.fill_(value)
        m.bn.num_batches_tracked.fill_(int(value))


def test_ema_momentum_by_hand() -> None:
    assert ema_momentum(1, 0.5, 1.0) == pytest.approx(0.5 * math.exp(-2.0) + 0.5)  # 0.5676676416
    assert ema_momentum(1, 0.0002, 2000) == pytest.approx(0.9998 * math.exp(-2 / 2000) + 0.0002)
    assert ema_momentum(10**7, 0.0002, 2000) == pytest.approx(0.0002)


def test_ema_update_values() -> None:
    src = _Toy()
    _fill(src, 1.0)
    ema = ExpMomentumEMA(src, momentum=0.5, gamma=1.0)
    _fill(src, 5.0)
    ema.update(src)  # update 0 copies
    assert int(ema.steps) == 1
    assert ema.module.fc.weight.item() == 5.0 and ema.module.bn.running_var.item() == 5.0
    _fill(src, 3.0)
    ema.update(src)  # update 1: lerp(5, 3, m) with m = 0.5 exp(-2) + 0.5, once (the alias is not lerped twice)
    m = 0.5 * math.exp(-2.0) + 0.5
    expected = 5.0 + (3.0 - 5.0) * m  # 3.8646647168
    for t in (ema.module.fc.weight, ema.module.fc.bias, ema.module.bn.weight, ema.module.bn.running_mean):
        assert t.item() == pytest.approx(expected, abs=1e-6)
    assert ema.module.alias.weight is ema.module.fc.weight
    assert int(ema.module.bn.num_batches_tracked) == 3  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert src.fc.weight.item() == 3.0  # the source is untouched


# ------------------------------------------------------------------------------------------------ optimiser
def test_param_groups_on_a_toy() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)
            self.shared = self.conv

    groups = {g["group_name"]: g for g in rtmdet_param_groups(Net(), 0.05)}
    assert groups["decay"]["param_names"] == ["conv.weight", "fc.weight"]
    assert groups["decay"]["weight_decay"] == 0.05
    assert groups["no_decay"]["param_names"] == ["conv.bias", "bn.weight", "bn.bias", "fc.bias"]
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_param_groups_on_rtmdet() -> None:
    net = rtmdet_ins_tiny(1)
    groups = {g["group_name"]: g for g in rtmdet_param_groups(net, 0.05)}
    decay, no_decay = groups["decay"], groups["no_decay"]
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))  # every tensor once, shared convs included
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(p.numel() for p in net.parameters())
    assert all(p.ndim == 4 for p in decay["params"])  # only conv weights decay
    assert all(n.endswith(".weight") for n in decay["param_names"])
    names = set(no_decay["param_names"])
    for key in ("head.cls_convs.1.0.bn.weight", "backbone.stage1.1.attention.fc.bias", "head.rtm_cls.0.bias"):
        assert key in names
    # the level-1/2 tower convs are the level-0 tensors: listed once, under the level-0 name
    assert "head.cls_convs.0.0.conv.weight" in decay["param_names"]
    assert "head.cls_convs.1.0.conv.weight" not in decay["param_names"]
    assert all(not n.startswith("head.reg_convs") for n in decay["param_names"] + no_decay["param_names"])


def test_lr_schedule_values() -> None:
    f = lambda step: rtmdet_lr_factor(step, 100, 300, 1000, 1e-5, 150, 0.05)  # noqa: E731
    assert f(0) == pytest.approx(1e-5)
    assert f(500) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)
    assert f(999) == pytest.approx(1e-5 + (1 - 1e-5) * 0.999)
    assert f(1000) == 1.0  # warm-up end
    assert f(14_999) == 1.0
    assert f(15_000) == pytest.approx(1.0)  # cosine start (epoch 150)
    assert f(22_500) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way: cos(pi/2) = 0
    assert f(26_250) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert f(30_000) == pytest.approx(0.05)  # end (epoch 300): eta_min = 5% of the base lr
    assert f(40_000) == pytest.approx(0.05)
    # a short run where warm-up and cosine overlap: the factors multiply
    assert rtmdet_lr_factor(5, 2, 10, 10, 0.0, 2, 0.0) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 16)))


# ------------------------------------------------------------------------------------------------ module
def test_normalize_rgb_to_bgr() -> None:
    m = InstSegLitModule(rtmdet_ins_tiny(1), ema=False)
    img = torch.empty(1, 3, 2, 2)
    img[:, 0], img[:, 1], img[:, 2] = 123.675, 116.28, 103.53  # RGB = the BGR mean reversed
    assert torch.allclose(m.normalize(img), torch.zeros(1, 3, 2, 2), atol=1e-6)
    img[:, 0] = 123.675 + 58.395  # +1 std on red, which is BGR channel 2
    assert torch.allclose(m.normalize(img)[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_a_few_steps_reduce_the_loss(syn_root: Path) -> None:
    torch.manual_seed(0)
    dm = _datamodule(syn_root)
    dm.setup("fit")
    ds = dm.train_dataset
    ds.pipelines[ds.stage] = dm.test_pipeline()  # fixed inputs: the loss must go down on these two images
    batch = dm.train_dataloader().collate_fn([ds[0], ds[1]])
    m = InstSegLitModule(rtmdet_ins_tiny(1), ema=False)
    opt = torch.optim.AdamW(rtmdet_param_groups(m.model, 0.05), lr=5e-3)
    m.train()
    losses = []
    for _ in range(8):
        loss = sum(m.criterion(m(batch["img"]), batch["targets"]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.85 * losses[0], losses  # measured: 3.81 -> 2.79


def test_fit_validate_and_checkpoint(syn_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = _datamodule(syn_root)
    model = InstSegLitModule(rtmdet_ins_tiny(1), lr=0.004, warmup_iters=4, cosine_begin_epoch=1, val_name="synthetic")
    model.net_config = {"_target_": "bmp_lightning.models.components.rtmdet.rtmdet_ins.rtmdet_ins", "size": "tiny"}
    model.hparams.score_thr = 0.0  # a barely trained network: keep low scores so that every metric path runs
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=5,
        callbacks=[
            ValIntervalSwitch(switch_epoch=2, interval=1),
            # a checkpoint written in on_train_batch_end: it must hold the EMA of that very step
            ModelCheckpoint(
                tmp_path / "steps", "s{step}", every_n_train_steps=1, save_top_k=-1, auto_insert_metric_name=False
            ),
        ],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 2 and trainer.check_val_every_n_epoch == 1  # val ran in epoch 2 via the switch
    metrics = trainer.callback_metrics
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AR100"):
        assert 0.0 <= float(metrics[f"val/synthetic/{key}"]) <= 1.0
    assert "train/loss_cls" in metrics and "train/loss_mask" in metrics
    results = json.loads((tmp_path / "results_synthetic.segm.json").read_text())
    assert results and {"image_id", "bbox", "score", "segmentation", "category_id"} <= set(results[0])
    assert {r["category_id"] for r in results} == {1}

    # EMA: one update per optimizer step; lr of the last step from the schedule (steps/epoch 1, 2 epochs)
    assert int(model.ema_model.steps) == 2
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert lrs == pytest.approx([0.004 * rtmdet_lr_factor(2, 1, 2, 4, 1e-5, 1, 0.05)] * 2)
    assert trainer.optimizers[0].param_groups[1]["weight_decay"] == 0.0

    step_ckpt = torch.load(tmp_path / "steps" / "s2.ckpt", map_location="cpu", weights_only=True)
    assert step_ckpt["global_step"] == int(step_ckpt["state_dict"]["ema_model.steps"]) == 2

    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["num_classes"] == 1 and raw["net_config"]["size"] == "tiny"
    assert "ema_model.module.backbone.stem.0.conv.weight" in raw["state_dict"]
    assert "model.backbone.stem.0.conv.weight" in raw["state_dict"]

    detector = pytest.importorskip("bmp_lightning.detector")
    det = detector.Detector.from_checkpoint(ckpt, input_size=SIZE, score_thr=0.0)
    ema_sd = model.ema_model.module.state_dict()
    assert all(torch.equal(v, ema_sd[k]) for k, v in det.model.state_dict().items())
    # the Detector and the validation path feed the network the same tensor (RGB -> BGR, mean/std, pad 114)
    val_batch = next(iter(dm.val_dataloader()))
    img = val_batch["img"][0].permute(1, 2, 0).numpy().astype(np.uint8)
    h, w = val_batch["meta"][0]["img_shape"]
    x_det, scales = det.preprocess([img[:h, :w]])
    assert scales == [(1.0, 1.0)]
    torch.testing.assert_close(x_det, model.normalize(val_batch["img"][:1]))
    ours = model.predict_batch(val_batch)[0]
    assert ours["masks"].shape[1:] == tuple(val_batch["meta"][0]["ori_shape"])  # original image pixels

    # resume restores the EMA and its step count
    resumed = InstSegLitModule(rtmdet_ins_tiny(1), val_name="synthetic")
    resumed.load_state_dict(raw["state_dict"])
    resumed.on_load_checkpoint(raw)
    assert int(resumed.ema_model.steps) == 2 and resumed.net_config["size"] == "tiny"


def test_class_mismatch_is_an_error(syn_root: Path) -> None:
    with pytest.raises(ValueError, match="num_classes=2"):
        InstSegLitModule(rtmdet_ins_tiny(1), num_classes=2)
    dm = _datamodule(syn_root)
    m = InstSegLitModule(rtmdet_ins_tiny(3))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="datamodule has 1 classes"):
        trainer.validate(m, dm, verbose=False)


@pytest.mark.parametrize("layout", ["ours", "mmdet"])
def test_init_weights_80_to_1_classes(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(1)
    coco = rtmdet_ins_tiny(80)
    with torch.no_grad():
        for p in coco.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = coco.state_dict()
    path = tmp_path / "w.pth"
    torch.save({"state_dict": to_mmdet(sd), "meta": {}} if layout == "mmdet" else sd, path)

    net = rtmdet_ins_tiny(1)
    init_cls = net.head.rtm_cls[0].weight.detach().clone()
    left = load_init_weights(net, path)
    assert sorted(left) == sorted(k for k in sd if k.startswith("head.rtm_cls."))
    assert torch.equal(net.head.rtm_cls[0].weight, init_cls)  # reinitialised (its init kept), as upstream
    assert torch.equal(net.backbone.stem[0].conv.weight, coco.backbone.stem[0].conv.weight)
    assert torch.equal(net.head.cls_convs[2][1].bn.running_var, coco.head.cls_convs[2][1].bn.running_var)

    kept = rtmdet_ins_tiny(1)
    assert load_init_weights(kept, path, keep_classes=True) == []
    assert torch.equal(kept.head.rtm_cls[1].weight, coco.head.rtm_cls[1].weight[:1])

    # through the module: the EMA copy starts from the loaded weights
    m = InstSegLitModule(rtmdet_ins_tiny(1), init_weights=str(path))
    assert torch.equal(m.ema_model.module.backbone.stem[0].conv.weight, coco.backbone.stem[0].conv.weight)

    bad = tmp_path / "bad.pth"
    torch.save({"backbone.stem.0.conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        load_init_weights(rtmdet_ins_tiny(1), bad)
