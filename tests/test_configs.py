"""Every experiment under conf/experiment composes with train.yaml and builds; the paper recipes carry their values."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
ALL_EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# experiments of the BMP evaluation job (`python -m bmp_lightning.bmp +experiment=...`), not of train.yaml
BMP_JOB_EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e.startswith("bmp_") and e.endswith("_eval")]
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e not in BMP_JOB_EXPERIMENTS]
PAPER = ("vitpose_b", "maskpose_b")


def _experiment(compose, experiment: str, tmp_path: Path) -> DictConfig:
    """``experiment=<name>`` through a conftest factory; weights (``paths.root_dir``) and data in ``tmp_path``."""
    return compose(f"experiment={experiment}", f"paths.root_dir={tmp_path}", out_dir=tmp_path / "out")


def test_paper_experiments_exist():
    assert set(PAPER) <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(experiment: str, tmp_path: Path, cfg_train):
    """Resolve the whole config (no missing interpolation) and build the data module and the network."""
    import hydra

    cfg = _experiment(cfg_train, experiment, tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.experiment_name
    if cfg.get("data") is not None and "_target_" in cfg.data:
        dm = hydra.utils.instantiate(cfg.data)  # reads no file until setup
        assert dm.batch_size == cfg.data.batch_size
    model_cfg = cfg.get("model")
    if model_cfg is not None and "net" in model_cfg:
        net = hydra.utils.instantiate(model_cfg.net)  # ViT-B: ~0.5 s; weights files are not read here
        assert sum(p.numel() for p in net.parameters()) > 0
        if "_target_" in model_cfg:
            # the LightningModule itself, without the (absent, offline) init weights
            model = hydra.utils.instantiate(model_cfg, net=net, init_weights=None)
            assert any(m is net for m in model.modules())


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_recipe(experiment: str, tmp_path: Path, cfg_train):
    """BBoxMaskPose's recipe (docs/recipes.md#vitpose-b): the numbers a re-run must use."""
    from bmp_lightning.data.samplers import per_source_counts

    cfg = _experiment(cfg_train, experiment, tmp_path)
    m, d, t = cfg.model, cfg.data, cfg.trainer
    assert m._target_ == "bmp_lightning.models.pose_module.PoseLitModule"
    assert m.net._target_.rsplit(".", 1)[-1] in ("vitpose_b", "maskpose_b")  # the same network
    assert m.net.num_keypoints == 21 and m.net.drop_path_rate == 0.3
    assert (m.lr, m.weight_decay, tuple(m.betas)) == (5e-4, 0.1, (0.9, 0.999))
    assert (m.layer_decay, m.num_layers) == (0.75, 14)
    assert (m.warmup_iters, m.warmup_factor, list(m.milestones), m.gamma) == (500, 0.001, [170, 200], 0.1)
    assert m.flip_test is True and list(m.input_size) == [192, 256] and list(m.heatmap_size) == [48, 64]
    assert m.sigma == 2.0
    assert (t.max_epochs, t.check_val_every_n_epoch, t.devices, t.strategy) == (210, 5, 4, "ddp")
    assert (t.gradient_clip_val, t.gradient_clip_algorithm, t.use_distributed_sampler) == (1.0, "norm", False)
    assert d.batch_size == 64 and d.val_batch_size == 128 and d.photometric is False
    assert [s.name for s in d.train_sources] == ["coco", "mpii", "aic"]
    assert per_source_counts(d.batch_size, [s.ratio for s in d.train_sources]) == [22, 21, 21]
    assert [v.name for v in d.val_sets] == ["coco", "ochuman"]
    assert d.val_sets[0].bbox_file.endswith("rtmdet-l-ins-mask.json") and d.val_sets[0].bbox_score_thr == 0.3
    assert cfg.optimized_metric == "val/coco/AP" and cfg.callbacks.model_checkpoint.monitor == "val/coco/AP"
    assert cfg.logger.wandb.group == experiment
    if experiment == "vitpose_b":
        assert m.init_weights == "mae" and m.use_mask is False and d.use_mask is False
    else:
        assert m.init_weights == "vitpose-b-multi"  # by name: vrg-prague/BBoxMaskPose (interop/hub.py)
        assert m.use_mask is True and d.use_mask is True and d.mask_perturb is True and d.mask_alpha == 0.2
    # the composed data module gets the batch composition from the sampler
    import hydra

    dm = hydra.utils.instantiate(d)
    dm.train_source_sizes = [1000, 500, 2000]  # what setup() would read from the annotation files
    sampler = dm.train_batch_sampler()
    assert sampler.batch_size == 64 and sampler.counts == [22, 21, 21]
    batch = next(iter(sampler))
    per_source = [sum(lo <= i < hi for i in batch) for lo, hi in ((0, 1000), (1000, 1500), (1500, 3500))]
    assert per_source == [22, 21, 21]


def test_paper_layer_decay_on_vit_b(tmp_path: Path, cfg_train):
    """The composed ViTPose-B module's optimizer groups: head x1, last block x0.75, patch embedding x0.75^13."""
    import hydra

    from bmp_lightning.models.optim import layer_decay_param_groups

    cfg = _experiment(cfg_train, "vitpose_b", tmp_path)
    net = hydra.utils.instantiate(cfg.model.net)
    groups = layer_decay_param_groups(
        net, base_lr=cfg.model.lr, weight_decay=cfg.model.weight_decay, layer_decay=0.75, num_layers=14
    )
    by_name = {}
    names = {id(p): n for n, p in net.named_parameters()}
    for g in groups:
        for p in g["params"]:
            by_name[names[id(p)]] = g
    lr = cfg.model.lr
    assert by_name["head.final_layer.weight"]["lr"] == pytest.approx(lr)
    assert by_name["backbone.blocks.11.attn.qkv.weight"]["lr"] == pytest.approx(lr * 0.75)
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == pytest.approx(lr * 0.75**13)
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["weight_decay"] == 0.1


@pytest.mark.parametrize("experiment", ["eval_maskpose_b_official", "eval_vitpose_b_official"])
def test_official_eval_experiments_compose_with_eval_yaml(experiment: str, tmp_path: Path, cfg_eval):
    if experiment not in EXPERIMENTS:
        pytest.skip(f"{experiment} not in conf/experiment")
    cfg = _experiment(cfg_eval, experiment, tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.ckpt_path is None and cfg.model.init_weights == (
        "maskpose-b" if "maskpose" in experiment else "vitpose-b-multi"
    )
    assert cfg.model.use_mask == cfg.data.use_mask == ("maskpose" in experiment)
    assert [v.name for v in cfg.data.val_sets] == ["coco", "ochuman"]


@pytest.mark.parametrize("experiment", BMP_JOB_EXPERIMENTS)
def test_bmp_job_experiments_compose_with_bmp_yaml(experiment: str, tmp_path: Path, cfg_bmp):
    cfg = cfg_bmp(f"+experiment={experiment}", f"paths.data_dir={tmp_path}", f"paths.root_dir={tmp_path}")
    assert cfg.task_name == "bmp" and cfg.loop.num_iters >= 2


def test_detector_recipes_card_10e_and_config_300e(tmp_path: Path, cfg_train):
    """experiment=rtmdet_l_maskout: the released model's 10-epoch fine-tune (model card) with the 300-epoch config's
    schedule scaled to it; rtmdet_l_maskout_300e: the upstream config file. The first derives from the second."""
    import hydra

    from bmp_lightning.models.optim import rtmdet_lr_factor

    card, conf = (
        _experiment(cfg_train, "rtmdet_l_maskout", tmp_path),
        _experiment(cfg_train, "rtmdet_l_maskout_300e", tmp_path),
    )
    for cfg, epochs, warmup, cos_begin, switch, val_every in ((card, 10, 33, 5, 9, 1), (conf, 300, 1000, 150, 280, 10)):
        m, t, cb = cfg.model, cfg.trainer, cfg.callbacks
        assert (t.max_epochs, m.warmup_iters, m.cosine_begin_epoch) == (epochs, warmup, cos_begin)
        assert cb.instseg_pipeline_switch.switch_epoch == switch == cb.val_interval_switch.switch_epoch
        assert t.check_val_every_n_epoch == val_every and cfg.data.batch_size == 16 and m.lr == 0.002
        assert cfg.data.remove_prob == 0.5 and m.num_classes == 1 and t.sync_batchnorm is True
    assert card.experiment_name == "rtmdet_l_maskout" and conf.experiment_name == "rtmdet_l_maskout_300e"
    # the card's lr is one override away
    lr_card = cfg_train("experiment=rtmdet_l_maskout", f"paths.root_dir={tmp_path}", "model.lr=0.02", out_dir=tmp_path)
    assert lr_card.model.lr == 0.02
    # the scaled schedule: warm-up done after 33 steps, flat to epoch 5, cosine down to 5 % at epoch 10
    spe = 1000
    kw = dict(steps_per_epoch=spe, max_epochs=10, warmup_iters=33, cosine_begin_epoch=5)
    assert rtmdet_lr_factor(0, **kw) == pytest.approx(1e-5)
    assert rtmdet_lr_factor(33, **kw) == rtmdet_lr_factor(5 * spe, **kw) == 1.0
    assert rtmdet_lr_factor(int(7.5 * spe), **kw) == pytest.approx(0.525)
    assert rtmdet_lr_factor(10 * spe, **kw) == pytest.approx(0.05)
    switch = hydra.utils.instantiate(card.callbacks.instseg_pipeline_switch)
    assert switch.switch_epoch == 9
