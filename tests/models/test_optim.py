"""Layer-wise lr decay groups (MMPose ``layer_decay_optim_wrapper.py``) and the warm-up + multi-step schedule."""

from __future__ import annotations

from types import SimpleNamespace

import hydra
import pytest
import torch

from bmp_lightning.models.components.pose_net import vitpose_b, vitpose_tiny
from bmp_lightning.models.optim import (
    build_warmup_multistep,
    layer_decay_param_groups,
    layer_id,
    warmup_multistep_factor,
)

BASE_LR = 5e-4
WD = 0.1


def _expected(name: str, ndim: int) -> tuple[float, float]:
    """(lr multiplier, weight decay) written out from A11, independently of the module's regexes."""
    parts = name.split(".")
    if parts[1] in ("patch_embed", "pos_embed", "cls_token", "mask_token"):
        lid = 0
    elif parts[1] == "blocks":
        lid = int(parts[2]) + 1
    else:  # backbone.norm.*, head.*
        lid = 13
    no_wd = ndim == 1 or name.endswith(".bias") or "pos_embed" in name
    return 0.75 ** (13 - lid), 0.0 if no_wd else WD


@pytest.fixture(scope="module")
def groups_and_model():
    model = vitpose_b(num_keypoints=17)
    return layer_decay_param_groups(model, BASE_LR, WD, layer_decay=0.75, num_layers=14), model


def test_every_parameter_gets_the_a11_lr_and_wd(groups_and_model):
    groups, model = groups_and_model
    seen: dict[int, tuple[float, float]] = {}
    for g in groups:
        assert g["lr"] == pytest.approx(BASE_LR * g["lr_scale"], rel=1e-12)
        for p in g["params"]:
            assert id(p) not in seen, "parameter in two groups"
            seen[id(p)] = (g["lr"] / BASE_LR, g["weight_decay"])
    params = dict(model.named_parameters())
    assert len(seen) == len(params)
    for name, p in params.items():
        lr_mult, wd = seen[id(p)]
        exp_mult, exp_wd = _expected(name, p.ndim)
        assert lr_mult == pytest.approx(exp_mult, rel=1e-9), name
        assert wd == exp_wd, name


def test_a11_multiplier_values(groups_and_model):
    groups, model = groups_and_model
    mult = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert mult["backbone.pos_embed"] == pytest.approx(0.0237573, abs=1e-7)
    assert mult["backbone.patch_embed.proj.weight"] == pytest.approx(0.0237573, abs=1e-7)
    assert mult["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.0316764, abs=1e-7)
    assert mult["backbone.blocks.1.mlp.fc1.bias"] == pytest.approx(0.0422351, abs=1e-7)
    assert mult["backbone.blocks.10.norm1.weight"] == pytest.approx(0.5625)
    assert mult["backbone.blocks.11.mlp.fc2.weight"] == pytest.approx(0.75)
    assert mult["backbone.norm.weight"] == 1.0 and mult["head.final_layer.weight"] == 1.0
    assert mult["head.deconv_layers.0.weight"] == 1.0
    for name in ("backbone.pos_embed", "backbone.norm.weight", "backbone.blocks.3.norm2.bias", "head.final_layer.bias"):
        assert wd[name] == 0.0, name
    for name in ("head.deconv_layers.1.weight", "head.deconv_layers.4.bias", "backbone.patch_embed.proj.bias"):
        assert wd[name] == 0.0, name  # BN scale (1-D) and biases
    for name in (
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.11.attn.proj.weight",
        "head.deconv_layers.0.weight",
        "head.deconv_layers.3.weight",
        "head.final_layer.weight",
    ):
        assert wd[name] == WD, name
    # 14 layer ids x {decay, no decay}; id 0 has both (conv weight vs pos_embed/bias)
    assert sorted({g["layer_id"] for g in groups}) == list(range(14))
    assert len(groups) == 28


def test_groups_work_with_adamw(groups_and_model):
    groups, _ = groups_and_model
    opt = torch.optim.AdamW(groups, lr=BASE_LR, betas=(0.9, 0.999))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(0.75**13)


def test_layer_id_understands_mmpose_names_and_prefixes():
    assert layer_id("backbone.cls_token") == 0
    assert layer_id("backbone.mask_token") == 0
    assert layer_id("backbone.patch_embed.projection.weight") == 0
    assert layer_id("backbone.layers.3.attn.qkv.weight") == 4
    assert layer_id("backbone.ln1.weight") == 13
    assert layer_id("head.deconv_layers.0.weight") == 13  # "layers" inside the head is not a block
    assert layer_id("net.backbone.blocks.2.norm1.weight") == 3  # wrapped in a LightningModule
    assert layer_id("net.backbone.pos_embed") == 0
    with pytest.raises(ValueError, match="num_layers"):
        layer_id("backbone.blocks.12.norm1.weight", num_layers=14)


def test_frozen_parameters_are_left_out():
    model = vitpose_tiny(num_keypoints=17, depth=2)
    model.backbone.requires_grad_(False)
    groups = layer_decay_param_groups(model, BASE_LR, WD, num_layers=4)
    names = [n for g in groups for n in g["param_names"]]
    assert names and all(n.startswith("head.") for n in names)


def test_schedule_values_per_step():
    steps_per_epoch = 10
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(
        [{"params": [p], "lr": BASE_LR}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": BASE_LR * 0.75}],
        lr=BASE_LR,
    )
    sched = build_warmup_multistep(opt, steps_per_epoch, warmup_iters=500, warmup_factor=0.001)
    lrs, lrs_decayed = [], []
    for _ in range(2101):
        lrs.append(opt.param_groups[0]["lr"])
        lrs_decayed.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(BASE_LR * 0.001)
    assert lrs[250] == pytest.approx(BASE_LR * (0.001 + 0.999 * 0.5))  # halfway, linear
    assert lrs[100] == pytest.approx(BASE_LR * (0.001 + 0.999 * 0.2))
    assert lrs[499] == pytest.approx(BASE_LR * (0.001 + 0.999 * 499 / 500))
    assert lrs[500] == pytest.approx(BASE_LR)
    assert lrs[1699] == pytest.approx(BASE_LR)  # last step of epoch 169
    assert lrs[1700] == pytest.approx(BASE_LR * 0.1)  # first step of epoch 170
    assert lrs[1999] == pytest.approx(BASE_LR * 0.1)
    assert lrs[2000] == pytest.approx(BASE_LR * 0.01)
    assert lrs[2100] == pytest.approx(BASE_LR * 0.01)
    # the layer-decay ratio of each group survives the schedule
    assert all(d == pytest.approx(0.75 * b) for b, d in zip(lrs, lrs_decayed))


def test_schedule_factor_chains_warmup_and_milestones():
    # with 1 step per epoch both milestones fall inside the warm-up: the factors multiply (MMEngine chains them)
    assert warmup_multistep_factor(0, 1) == pytest.approx(0.001)
    assert warmup_multistep_factor(170, 1) == pytest.approx((0.001 + 0.999 * 170 / 500) * 0.1)
    assert warmup_multistep_factor(200, 1) == pytest.approx((0.001 + 0.999 * 200 / 500) * 0.01)
    assert warmup_multistep_factor(100, 1, milestones=(50,), warmup_iters=200) == pytest.approx(0.1 * 0.5005)
    with pytest.raises(ValueError):
        warmup_multistep_factor(0, 0)


def _lrs(cfg, steps_per_epoch: int, max_epochs: int, at: list[int]):
    """The configured module's optimizer + scheduler (its config groups), the lr of every group at ``at`` steps."""
    model = hydra.utils.instantiate(cfg.model, net=hydra.utils.instantiate(cfg.model.net), init_weights=None)
    dm = SimpleNamespace(train_batch_sampler=lambda: list(range(steps_per_epoch)))
    model._trainer = SimpleNamespace(
        datamodule=dm, limit_train_batches=1.0, accumulate_grad_batches=1, max_epochs=max_epochs
    )
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    out, step = [], 0
    for target in at:
        while step < target:
            opt.step()
            sched.step()
            step += 1
        out.append([g["lr"] for g in opt.param_groups])
    return out, opt, model


def test_optimizer_and_scheduler_groups_keep_the_vitpose_schedule(cfg_train):
    """conf/optimizer/adamw.yaml + conf/scheduler/warmup_multistep.yaml on the configured PoseLitModule: the lr at
    several steps equals the recipe's (5e-4, 50-step warm-up from 0.001 for the tiny model, x0.1 at epochs 170 and
    200; layer decay 0.9 over 5 ids: the first layer at 0.9**4)."""
    cfg = cfg_train("model=vitpose_tiny")
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW" and cfg.model.scheduler._partial_
    lrs, opt, model = _lrs(cfg, steps_per_epoch=10, max_epochs=210, at=[0, 25, 50, 1699, 1700, 2000])
    top = [max(g) for g in lrs]  # the head's groups: scale 1
    assert top == pytest.approx([5e-7, 2.5025e-4, 5e-4, 5e-4, 5e-5, 5e-6], rel=1e-9)
    assert [min(g) for g in lrs] == pytest.approx([t * 0.9**4 for t in top], rel=1e-9)
    assert opt.defaults["betas"] == (0.9, 0.999) and isinstance(opt, torch.optim.AdamW)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}
    assert "optimizer" not in model.hparams and "scheduler" not in model.hparams  # checkpoints hold plain values


def test_optimizer_and_scheduler_groups_keep_the_rtmdet_schedule(cfg_train):
    """conf/scheduler/warmup_cosine.yaml on the configured InstSegLitModule: 0.004, 1000-step warm-up from 1e-5,
    flat until epoch 150, cosine to 5 % at epoch 300 (10 steps per epoch)."""
    cfg = cfg_train("model=rtmdet_ins_tiny", "model.init_weights=null")
    lrs, opt, _ = _lrs(cfg, steps_per_epoch=10, max_epochs=300, at=[0, 500, 1000, 1500, 2250, 3000])
    want = [4e-8, 0.004 * 0.500005, 0.004, 0.004, 0.004 * 0.525, 0.004 * 0.05]
    assert [g[0] for g in lrs] == pytest.approx(want, rel=1e-9)
    assert all(len(set(g)) == 1 for g in lrs)  # decay / no-decay groups share the lr
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
